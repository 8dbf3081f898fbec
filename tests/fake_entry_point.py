"""A stand-in entry point for tests/test_entry_runner.py: `run()` does what its command line
says (--exit=N|none: print its arguments to stdout, a line to stderr, exit with N; --raise: an
exception; --hang: sleep). It imports JAX, as the real entry points do, but computes nothing."""
import sys
import time

import jax  # noqa: F401 - the real entry points' imports, without a backend


def run() -> None:
    args = sys.argv[1:]
    if "--raise" in args:
        raise RuntimeError("a bug")
    if "--hang" in args:
        time.sleep(60)
    print("out:", args)
    print("err: bad", file=sys.stderr)
    code = next(a.split("=", 1)[1] for a in args if a.startswith("--exit="))
    raise SystemExit(None if code == "none" else int(code))


def other_entry() -> None:
    print("other entry")


if __name__ == "__main__":
    run()
