# Tests see 4 CPU devices, so multi-device (pmap) logic runs on any machine. This must be
# set before jax is first imported.
import os
import shutil
import tempfile

# XLA:CPU's LLVM backend at -O0: the suite's programs are tiny and mostly compiled once, so
# compiling them is most of the suite's time and running them little; -O0 halves the
# compiles (a K=3 sweep step: 15.2 -> 8.4 s of compiles). Every HLO pass still runs, so the
# programs, their fusions and their buffers are the same; only the machine code is slower.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
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


# Seconds each test file takes in the full suite (2-core Xeon, the session cache warm within
# the run, measured at the commit that last changed this table): `--dist loadfile` hands the
# files to the two workers in collection order, so the longest go first and the workers
# finish together. A file not listed counts as 5 s. Only the order of files changes, never
# that of the tests in a file.
FILE_SECONDS = {
    "test_backbones.py": 74, "test_train.py": 65, "test_benchmark.py": 65,
    "test_multihost.py": 59, "test_sweep.py": 49, "test_sharding.py": 46,
    "test_reproduce.py": 42, "test_workdirs.py": 35, "test_blocks.py": 34, "test_bert.py": 32,
    "test_fpt.py": 29, "test_fashion_mnist_integration.py": 29, "test_align.py": 28,
    "test_bad_inputs.py": 27, "test_llama.py": 26, "test_train_cli.py": 23,
    "test_sweep_loop.py": 22, "test_mixed_precision.py": 22, "test_attention.py": 21,
    "test_baselines.py": 20, "test_mixer.py": 19, "test_sweep_cli.py": 17, "test_lstm.py": 16,
    "test_protocol.py": 16, "test_lstm_original.py": 15, "test_fnet.py": 15, "test_vit.py": 14,
    "test_entry_runner.py": 13, "test_gpt2.py": 13, "test_bad_inputs_tools.py": 11,
    "test_edges.py": 10, "test_weights.py": 10, "test_cheap_paths.py": 9, "test_config.py": 7,
    "test_prepare_data.py": 5,
}


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the schedule's
        items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 5))  # stable


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
