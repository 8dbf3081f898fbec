# Tests see 4 CPU devices, so multi-device (pmap) logic runs on any machine. This must be
# set before jax is first imported.
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache per test session, in a temporary directory: the suite
# compiles the same tiny programs over and over (every test file, every entry point started
# in a subprocess, every case of a table), and XLA's compiles are most of its time. The
# session's first process (pytest, or xdist's controller) makes it; its xdist workers and all
# the processes they start inherit it through the environment. Every compile is cached, however
# short (min time 0, no minimum size). A cache hit is the same executable, so results are
# identical with or without it. Set JAX_COMPILATION_CACHE_DIR to use (and keep) a cache of
# your own, or to "" to run without one.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="fpt_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_configure(config):
    # `python -m pytest -m "not slow" tests`: the fast tier, the inner loop (README). Slow:
    # end-to-end runs of the entry points, subprocesses, multi-process runs, whole trainings.
    config.addinivalue_line(
        "markers", "slow: an end-to-end or subprocess test, left out of the fast tier "
                   "(-m 'not slow')")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
