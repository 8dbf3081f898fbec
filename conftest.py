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
    # xdist orders the files by their number of tests unless told not to: keep FILE_SECONDS's
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# Seconds each test file takes in the full suite with a warm session cache (2-core Zen 3 EPYC,
# measured at the commit that last changed this table): `--dist loadfile` hands the files to
# the two workers in collection order, so the longest go first and the workers finish
# together. A file not listed counts as 5 s. Only the order of files changes, never that of
# the tests in a file.
FILE_SECONDS = {
    "test_backbones.py": 150, "test_train.py": 125, "test_benchmark.py": 114,
    "test_reproduce.py": 100, "test_bad_inputs.py": 90, "test_fpt.py": 85,
    "test_multihost.py": 75, "test_bert.py": 70, "test_sweep.py": 61, "test_sweep_loop.py": 56,
    "test_workdirs.py": 51, "test_train_cli.py": 50, "test_mixed_precision.py": 45,
    "test_sweep_cli.py": 42, "test_attention.py": 37, "test_vit.py": 36, "test_gpt2.py": 35,
    "test_fashion_mnist_integration.py": 35, "test_lstm.py": 29, "test_protocol.py": 28,
    "test_fnet.py": 28, "test_bad_inputs_tools.py": 26, "test_weights.py": 21,
    "test_baselines.py": 20, "test_config.py": 12, "test_prepare_data.py": 9,
    "test_freeze.py": 9, "test_entry_runner.py": 15,
}


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the schedule's
        items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 5))  # stable


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
