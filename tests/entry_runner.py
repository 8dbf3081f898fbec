"""Runs the entry points on many command lines, fast and fork-safe: every command line in a
process of its own, forked from a server that imported their dependencies once.

Used by the bad-input tests: `run_all(module, cases)` gives `[{"rc": ..., "stdout": ...,
"stderr": ..., "jax_backend_at_fork": ...}, ...]`. Each case runs `module` as `python -m
module` does (its `__main__` block: the prologue, then `app.run(...)`) with `sys.argv` set,
`jobs` cases at a time, and is killed after `timeout` seconds (rc -9).

The cases are forked by a multiprocessing 'forkserver': a fresh interpreter (spawned, not
forked from pytest) that imports what the entry points import (PRELOAD: all but the entry
modules themselves, whose absl flags clash: each case imports its own) and then only forks.
It never computes, so no JAX backend (and none of its threads) exists when a case is forked;
each case reports whether one did (`jax_backend_at_fork`, checked by the tests). The imports
(~4 s) are paid once per test process and environment: the server (`python -m
tests.entry_runner`, one request a line on stdin) is kept for later calls; a case pays a fork
and the import of its entry module.
"""
from __future__ import annotations

import atexit
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import runpy
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _jax_backend_started() -> bool:
    """Whether this process has initialised a JAX backend (without importing JAX)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def _child(module_name: str, function: str | None, args: list[str], out_path: str,
           err_path: str, meta_path: str) -> None:
    """One case, in a process forked by the server: the entry point, as its own process
    would run it, its output into the files."""
    with open(meta_path, "w") as f:  # the server's state, as this fork inherited it
        json.dump({"jax_backend_at_fork": _jax_backend_started()}, f)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = os.fdopen(1, "w", closefd=False)
    sys.stderr = os.fdopen(2, "w", closefd=False)
    code = 0
    try:
        if function is None:  # as `python -m module_name` (its dependencies are imported)
            sys.argv = [module_name, *args]  # run_module puts the module's path first
            runpy.run_module(module_name, run_name="__main__", alter_sys=True)
        else:
            module = importlib.import_module(module_name)
            sys.argv = [module.__file__, *args]
            getattr(module, function)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a traceback, as the real process prints
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Case:
    """One case's process and its output files."""

    def __init__(self, ctx, module_name: str, function: str | None, args: list[str],
                 timeout: float,
                 tmp: str, index: int):
        self.paths = [os.path.join(tmp, f"{index}.{n}") for n in ("out", "err", "meta")]
        for path in self.paths:
            open(path, "wb").close()
        self.process = ctx.Process(target=_child,
                                   args=(module_name, function, args, *self.paths))
        self.deadline = time.monotonic() + timeout
        self.process.start()

    def poll(self) -> dict | None:
        if self.process.exitcode is None:
            if time.monotonic() <= self.deadline:
                return None
            self.process.kill()
            self.process.join()
        rc = self.process.exitcode
        self.process.close()
        result = {"rc": rc}
        for name, path in zip(("stdout", "stderr"), self.paths):
            with open(path, "rb") as f:
                result[name] = f.read().decode(errors="replace")
        with open(self.paths[2]) as f:
            meta = f.read()
        result["jax_backend_at_fork"] = json.loads(meta)["jax_backend_at_fork"] if meta else None
        return result


# What the entry points (experiments/*.py) import, and tensorboardX, which they import once
# they train (fpt_jax.metrics; it pulls in torch where torch is installed). A module missing
# here is imported by each case itself: slower, the same result.
PRELOAD = ["experiments.cli", "fpt_jax.loop", "fpt_jax.results", "fpt_jax.sweep",
           "fpt_jax.weights", "fpt_jax.models.backbones", "fpt_jax.tasks.listops",
           "fpt_jax.tasks.tfds_builders", "fpt_jax.bench.settings", "fpt_jax.reproduce",
           "fpt_jax.reproduce_report", "tensorboardX"]


def run_cases(module_name: str, cases: list[list[str]], timeout: float, jobs: int,
              function: str | None = None) -> list[dict]:
    """Every case in a process of its own, forked by this process's forkserver (started on
    the first call, with PRELOAD imported), `jobs` at a time; results in the order of
    `cases`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, _Case] = {}
    next_case = 0
    with tempfile.TemporaryDirectory(prefix="entry_runner") as tmp:
        while next_case < len(cases) or running:
            while next_case < len(cases) and len(running) < jobs:
                running[next_case] = _Case(ctx, module_name, function, cases[next_case],
                                           timeout, tmp, next_case)
                next_case += 1
            multiprocessing.connection.wait([c.process.sentinel for c in running.values()],
                                            timeout=0.2)
            for i, case in list(running.items()):
                result = case.poll()
                if result is not None:
                    results[i] = result
                    del running[i]
    return results


# --- the client side: one server per environment, kept for the session ---

_SERVERS: dict[tuple, "_Server"] = {}
MAX_SERVERS = 2  # per test process: the least recently used one is closed beyond


class _Server:
    """`python -m tests.entry_runner`: imports nothing itself; its forkserver imports PRELOAD
    once, then every request's cases are forked from it."""

    def __init__(self, env: dict, root: Path):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "tests.entry_runner"],
                                        cwd=root, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log)

    def request(self, request: dict, wait: float) -> list[dict]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        try:
            self.process.stdin.write((json.dumps({**request, "result": path}) + "\n").encode())
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], wait)
            line = self.process.stdout.readline() if ready else b""
            if line.strip() != b"done":
                self.close()
                self.log.seek(0)
                raise RuntimeError(f"entry_runner failed (rc {self.process.returncode}):\n"
                                   f"{self.log.read().decode(errors='replace')[-3000:]}")
            with open(path) as f:
                return json.load(f)
        finally:
            os.unlink(path)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the server ends at the end of its input
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@atexit.register
def _close_servers() -> None:
    for server in _SERVERS.values():
        server.close()
    _SERVERS.clear()


def run_all(module: str, cases: list[list[str]], env: dict | None = None,
            timeout: float = 180, jobs: int | None = None,
            function: str | None = None) -> list[dict]:
    """The client side: runs `cases` of entry point `module` (e.g. 'experiments.train') as
    `python -m module` does (or, given `function`, calls `module.<function>()` instead),
    from the repository root,
    `jobs` at a time (default: the machine's cores; the cases must not depend on each
    other). The server that forks them is kept for later calls with the same environment
    (this process's, as of the call, with `env` on top)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FPT_JAX_HUGEPAGES": "0", "JAX_PLATFORMS": "cpu", **(env or {})}
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's, changes with every test
    key = tuple(sorted(env.items()))
    server = _SERVERS.pop(key, None)
    if server is None or not server.alive():
        server = _Server(env, root)
    while len(_SERVERS) >= MAX_SERVERS:
        _SERVERS.pop(next(iter(_SERVERS))).close()
    _SERVERS[key] = server  # the most recently used last
    return server.request({"module": module, "cases": cases, "timeout": timeout,
                           "function": function,
                           "jobs": jobs or os.cpu_count() or 1},
                          wait=timeout * len(cases) + 120)


def main() -> None:
    """The server: one JSON request a line on stdin ({module, cases, timeout, jobs, function,
    result}); writes the results to the request's `result` path, then `done` to stdout. Ends
    at the end of stdin."""
    for line in sys.stdin:
        request = json.loads(line)
        results = run_cases(request["module"], request["cases"], request.get("timeout", 180),
                            request.get("jobs", 1), request.get("function"))
        with open(request["result"], "w") as f:
            json.dump(results, f)
        sys.stdout.write("done\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
