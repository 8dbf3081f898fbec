"""Transparent huge pages for the host memory XLA:CPU allocates, via glibc's malloc.

A CPU train step streams every frozen weight (340 MB for `gpt2`) twice per step and, in full
fine-tuning, the optimizer state as well; with 4 KiB pages that walk misses the TLB all
the time. glibc >= 2.35 asks the kernel for transparent huge pages on malloc's large
allocations when the process starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; measured
on the 2-core CPU this project is developed on (fp32, `gpt2`, medians of 8 steps, two
alternating pairs of processes): frozen CIFAR-10-shape step 1,143-1,272 -> 982-1,003 ms,
full fine-tuning at the Bit XOR shape 590-727 -> 410-444 ms.

A tunable is read once, at process start, so the entry points re-execute themselves with
it (`reexec_with_huge_pages`), on CPU backends only (`cpu_backend`). Nothing changes when
the user already set `GLIBC_TUNABLES`,
when `FPT_JAX_HUGEPAGES=0` (set it when a debugger or IPython's `%run` runs the entry point
in its own process), for a program read from stdin, or off Linux/glibc; an older glibc
ignores the tunable. A process re-executes at most once (`_MARKER`), and carries on without
huge pages when it cannot.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FPT_JAX_HUGEPAGES"
_MARKER = "FPT_JAX_HUGEPAGES_REEXECUTED"  # set in the re-executed process: never twice


def wanted(environ: dict | os._Environ = os.environ) -> bool:
    """Whether this process should be re-executed with the tunable."""
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and "GLIBC_TUNABLES" not in environ and environ.get(OPT_OUT, "1") != "0"
            and _MARKER not in environ and cpu_backend(environ)
            and sys.argv[0] not in ("-", ""))  # stdin was read already: it cannot rerun


def cpu_backend(environ: dict | os._Environ = os.environ) -> bool:
    """Whether JAX will compute on the CPU, decided before JAX loads: `JAX_PLATFORMS` names
    cpu first, or it is unset and no accelerator plugin (CUDA, ROCm, TPU) is installed. The
    huge-page gain was measured on XLA:CPU only; on GPU/TPU the weights live in device
    memory and the restart buys nothing."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    # JAX finds plugins by entry point or in the `jax_plugins` namespace package.
    plugins = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    return (not plugins and importlib.util.find_spec("jax_plugins") is None
            and importlib.util.find_spec("libtpu") is None)


def reexec_with_huge_pages() -> None:
    """Re-executes this command (`sys.orig_argv`) with `GLIBC_TUNABLES` set, if `wanted`.
    Call it first thing in a `__main__` block: nothing before it runs twice."""
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLE, **{_MARKER: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # e.g. no usable sys.executable: run on, without huge pages
        print(f"fpt_jax: not restarting with huge pages ({e})", file=sys.stderr)
