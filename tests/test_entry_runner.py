"""The bad-input tests' runner reports what the entry point's own process would: its exit
code, its output, a traceback as a non-zero code, and a hang as a kill; it forks each case
from a server that never started a JAX backend (no fork of a multithreaded JAX process), even
when the caller did; and it keeps that server for later calls with the same environment."""
import jax.numpy as jnp

import pytest

from tests import entry_runner

pytestmark = pytest.mark.slow  # starts processes (servers, forked cases)

FAKE = "tests.fake_entry_point"


def test_exit_codes_output_and_argv_reach_the_result():
    float(jnp.ones(2).sum())  # this (pytest's) process has a JAX backend: the cases must not
    assert entry_runner._jax_backend_started()
    results = entry_runner.run_cases(FAKE, [["--exit=2", "--a=1"], ["--exit=2", "--b"],
                                            ["--exit=none"]], 30, jobs=2)
    assert [r["rc"] for r in results] == [2, 2, 0]
    assert results[0]["stdout"] == "out: ['--exit=2', '--a=1']\n"
    assert results[1]["stdout"] == "out: ['--exit=2', '--b']\n"
    assert all(r["stderr"] == "err: bad\n" for r in results)  # no fork warning
    assert [r["jax_backend_at_fork"] for r in results] == [False] * 3


def test_an_exception_is_a_traceback_and_rc_1_and_a_hang_is_killed():
    crashed, hung = entry_runner.run_cases(FAKE, [["--raise"], ["--hang"]], 2, 2)
    assert crashed["rc"] == 1 and "Traceback" in crashed["stderr"] and "a bug" in crashed["stderr"]
    assert hung["rc"] == -9


def test_one_server_per_environment_serves_every_module_and_the_named_function():
    while entry_runner._SERVERS:  # servers other tests of this process started (at most 2)
        entry_runner._SERVERS.popitem()[1].close()
    first, = entry_runner.run_all(FAKE, [["--exit=3"]])
    server, = entry_runner._SERVERS.values()
    again, = entry_runner.run_all(FAKE, [["--exit=4"]])
    real, = entry_runner.run_all("experiments.convert", [["--no_such_flag"]])
    assert (first["rc"], again["rc"], real["rc"]) == (3, 4, 2)
    assert "no_such_flag" in real["stderr"]
    assert list(entry_runner._SERVERS.values()) == [server]  # the same server for all three
    other, = entry_runner.run_all(FAKE, [["--exit=5"]], env={"FPT_JAX_TEST_OTHER": "1"})
    assert other["rc"] == 5 and server.alive() and len(entry_runner._SERVERS) == 2
    named, = entry_runner.run_all(FAKE, [[]], function="other_entry")
    assert named["rc"] == 0 and named["stdout"] == "other entry\n"


def test_the_real_entry_point_through_a_subprocess():
    result, = entry_runner.run_all("experiments.train", [["--config.steps=-1",
                                                          "--workdir=/tmp/unused"]])
    assert result["rc"] == 2 and "error: steps=-1" in result["stderr"]
    assert result["jax_backend_at_fork"] is False  # the server imported it, computed nothing
    assert "os.fork()" not in result["stderr"]
