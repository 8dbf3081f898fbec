"""Runs one entry point on many command lines, fast: imported once, then one forked child per
command line (a fresh process state for each, without paying the imports again).

Used by the bad-input tests. Reads `{"module": ..., "cases": [[arg, ...], ...], "timeout":
..., "jobs": ...}` as JSON on stdin and writes `[{"rc": ..., "stdout": ..., "stderr": ...},
...]` as JSON to stdout. Each child runs `module.run()` (the entry point's `app.run(...)`)
with `sys.argv` set, `jobs` children at a time, and is killed after `timeout` seconds (rc
-9). JAX's backends are not started before the fork (the parent never computes).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile
import time


class _Child:
    """One case, running in a forked child with its output in temporary files."""

    def __init__(self, module, args: list[str], timeout: float):
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.deadline = time.monotonic() + timeout
        self.pid = os.fork()
        if self.pid == 0:  # the child: the entry point, as its own process would run it
            os.dup2(self.out.fileno(), 1)
            os.dup2(self.err.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            sys.argv = [module.__file__, *args]
            code = 0
            try:
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

    def poll(self) -> dict | None:
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
        elif time.monotonic() > self.deadline:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            rc = -9
        else:
            return None
        result = {"rc": rc}
        for name, f in (("stdout", self.out), ("stderr", self.err)):
            f.seek(0)
            result[name] = f.read().decode(errors="replace")
            f.close()
        return result


def run_cases(module, cases: list[list[str]], timeout: float, jobs: int) -> list[dict]:
    """Every case in a child of its own, `jobs` at a time; results in the order of `cases`."""
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, _Child] = {}
    next_case = 0
    while next_case < len(cases) or running:
        while next_case < len(cases) and len(running) < jobs:
            running[next_case] = _Child(module, cases[next_case], timeout)
            next_case += 1
        for i, child in list(running.items()):
            result = child.poll()
            if result is not None:
                results[i] = result
                del running[i]
        time.sleep(0.02)
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
    module = importlib.import_module(request["module"])
    results = run_cases(module, request["cases"], request.get("timeout", 180),
                        request.get("jobs", 1))
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
