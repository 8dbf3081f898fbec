"""The bad-input tests' runner reports what the entry point's own process would: its exit
code, its output, a traceback as a non-zero code, and a hang as a kill."""
import sys
import types

from tests import entry_runner


def _module(run) -> types.ModuleType:
    module = types.ModuleType("fake_entry_point")
    module.__file__ = "fake_entry_point.py"
    module.run = run
    return module


def _exit_with(code):
    def run():
        print("out:", sys.argv[1:])
        print("err: bad", file=sys.stderr)
        raise SystemExit(code)
    return run


def test_exit_codes_output_and_argv_reach_the_result():
    results = entry_runner.run_cases(_module(_exit_with(2)), [["--a=1"], ["--b"]], 30, jobs=2)
    assert [r["rc"] for r in results] == [2, 2]
    assert results[0]["stdout"] == "out: ['--a=1']\n" and results[1]["stdout"] == "out: ['--b']\n"
    assert all(r["stderr"] == "err: bad\n" for r in results)
    assert entry_runner.run_cases(_module(_exit_with(None)), [[]], 30, 1)[0]["rc"] == 0


def test_an_exception_is_a_traceback_and_rc_1_and_a_hang_is_killed():
    def boom():
        raise RuntimeError("a bug")

    def hang():
        import time
        time.sleep(60)
    crashed, = entry_runner.run_cases(_module(boom), [[]], 30, 1)
    assert crashed["rc"] == 1 and "Traceback" in crashed["stderr"] and "a bug" in crashed["stderr"]
    hung, = entry_runner.run_cases(_module(hang), [[]], 0.5, 1)
    assert hung["rc"] == -9


def test_the_real_entry_point_through_a_subprocess():
    result, = entry_runner.run_all("experiments.train", [["--config.steps=-1",
                                                          "--workdir=/tmp/unused"]])
    assert result["rc"] == 2 and "error: steps=-1" in result["stderr"]
