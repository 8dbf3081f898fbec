"""Runs one entry point on many command lines, fast and fork-safe: every command line in a
process of its own, forked from a server that imported the entry point once.

Used by the bad-input tests. Reads `{"module": ..., "cases": [[arg, ...], ...], "timeout":
..., "jobs": ...}` as JSON on stdin and writes `[{"rc": ..., "stdout": ..., "stderr": ...,
"jax_backend_at_fork": ...}, ...]` as JSON to stdout. Each case runs `module.run()` (the
entry point's `app.run(...)`) with `sys.argv` set, `jobs` cases at a time, and is killed after
`timeout` seconds (rc -9).

The cases are forked by a multiprocessing 'forkserver': a fresh interpreter (spawned, not
forked from this one or from pytest) that imports the entry point and then only forks. It
never computes, so no JAX backend (and none of its threads) exists when a case is forked;
each case reports whether one did (`jax_backend_at_fork`, checked by the tests). Importing
the entry point is what the server pays once (JAX, flax, ... ~3 s); a case pays a fork.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time


def _jax_backend_started() -> bool:
    """Whether this process has initialised a JAX backend (without importing JAX)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(xla_bridge is not None and getattr(xla_bridge, "_backends", None))


def _child(module_name: str, args: list[str], out_path: str, err_path: str,
           meta_path: str) -> None:
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
        module = importlib.import_module(module_name)  # the server imported it: no cost
        sys.argv = [module.__file__, *args]
        module.run()
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

    def __init__(self, ctx, module_name: str, args: list[str], timeout: float, tmp: str,
                 index: int):
        self.paths = [os.path.join(tmp, f"{index}.{n}") for n in ("out", "err", "meta")]
        for path in self.paths:
            open(path, "wb").close()
        self.process = ctx.Process(target=_child, args=(module_name, args, *self.paths))
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


def run_cases(module_name: str, cases: list[list[str]], timeout: float,
              jobs: int) -> list[dict]:
    """Every case in a process of its own, forked by a forkserver that imported
    `module_name`, `jobs` at a time; results in the order of `cases`. The forkserver is this
    process's (multiprocessing keeps one per process): one entry point per process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([module_name])
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, _Case] = {}
    next_case = 0
    with tempfile.TemporaryDirectory(prefix="entry_runner") as tmp:
        while next_case < len(cases) or running:
            while next_case < len(cases) and len(running) < jobs:
                running[next_case] = _Case(ctx, module_name, cases[next_case], timeout, tmp,
                                           next_case)
                next_case += 1
            multiprocessing.connection.wait([c.process.sentinel for c in running.values()],
                                            timeout=0.2)
            for i, case in list(running.items()):
                result = case.poll()
                if result is not None:
                    results[i] = result
                    del running[i]
    return results


def run_all(module: str, cases: list[list[str]], env: dict | None = None,
            timeout: float = 180, jobs: int | None = None) -> list[dict]:
    """The client side: runs `cases` of entry point `module` (e.g. 'experiments.train') in
    one subprocess of this runner, from the repository root, `jobs` at a time (default: the
    machine's cores; the cases must not depend on each other)."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FPT_JAX_HUGEPAGES": "0", "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tests.entry_runner"], cwd=root, env=env,
                          input=json.dumps({"module": module, "cases": cases,
                                            "timeout": timeout,
                                            "jobs": jobs or os.cpu_count() or 1}),
                          capture_output=True, text=True, timeout=timeout * len(cases) + 120)
    if proc.returncode:
        raise RuntimeError(f"entry_runner failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    request = json.load(sys.stdin)
    results = run_cases(request["module"], request["cases"], request.get("timeout", 180),
                        request.get("jobs", 1))
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
