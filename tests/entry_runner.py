"""Runs one entry point on many command lines, fast: imported once, then one forked child per
command line (a fresh process state for each, without paying the imports again).

Used by the bad-input tests. Reads `{"module": ..., "cases": [[arg, ...], ...]}` as JSON on
stdin and writes `[{"rc": ..., "stdout": ..., "stderr": ...}, ...]` as JSON to stdout. Each
child runs `module.run()` (the entry point's `app.run(...)`) with `sys.argv` set, and is
killed after `timeout` seconds (rc -9). JAX's backends are not started before the fork.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile
import time


def run_case(module, args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: the entry point, with its output in the files
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
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
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def run_all(module: str, cases: list[list[str]], env: dict | None = None,
            timeout: float = 180) -> list[dict]:
    """The client side: runs `cases` of entry point `module` (e.g. 'experiments.train') in
    one subprocess of this runner, from the repository root."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FPT_JAX_HUGEPAGES": "0", "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tests.entry_runner"], cwd=root, env=env,
                          input=json.dumps({"module": module, "cases": cases,
                                            "timeout": timeout}),
                          capture_output=True, text=True, timeout=timeout * len(cases) + 120)
    if proc.returncode:
        raise RuntimeError(f"entry_runner failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    request = json.load(sys.stdin)
    module = importlib.import_module(request["module"])
    results = [run_case(module, args, request.get("timeout", 180))
               for args in request["cases"]]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
