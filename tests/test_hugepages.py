"""The entry points re-execute themselves with glibc's huge-page tunable, unless told not to."""
import os
import platform
import subprocess
import sys

import pytest

from fpt_jax import hugepages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc tunables exist on Linux/glibc only")

PROBE = ("from fpt_jax import hugepages; hugepages.reexec_with_huge_pages(); import os, sys; "
         "import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
         "p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); "
         "huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]; "
         "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], huge[0].split()[1] if huge else -1)")


def _run(**env_changes) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._MARKER)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE, "--flag=1"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.strip().rsplit(" ", 1)[0].split(" ", 1) + [out.strip().rsplit(" ", 1)[1]]


@pytest.mark.slow
def test_reexecutes_the_same_command_with_the_huge_page_tunable():
    tunables, argv, huge_kib = _run()
    assert tunables == hugepages.TUNABLE
    assert argv == "['--flag=1']"  # the command line survives the re-execution
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[never]" not in open(thp).read():
        assert int(huge_kib) > 0  # a 64 MiB malloc is backed by huge pages


@pytest.mark.slow
def test_leaves_a_users_tunables_and_the_opt_out_alone():
    assert _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")[0] == "glibc.malloc.hugetlb=0"
    tunables, _, huge_kib = _run(**{hugepages.OPT_OUT: "0"})
    assert tunables == "None"
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp) and "[madvise]" in open(thp).read():
        assert int(huge_kib) == 0  # malloc alone asks for no huge page


@pytest.mark.slow
def test_reexecutes_at_most_once_and_never_a_program_read_from_stdin():
    # the loader may drop GLIBC_TUNABLES (glibc >= 2.39 in secure mode): the marker still
    # stops a second restart
    assert _run(**{hugepages._MARKER: "1"})[0] == "None"
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._MARKER)}
    out = subprocess.run([sys.executable, "-"], input=PROBE.replace("sys.argv[1:]", "1"),
                         env=env, check=True, capture_output=True, text=True).stdout
    assert out.startswith("None ")  # ran, without a restart that would have lost stdin


def test_only_cpu_backends_are_restarted():
    assert hugepages.cpu_backend({"JAX_PLATFORMS": "cpu"})
    assert not hugepages.cpu_backend({"JAX_PLATFORMS": "cuda,cpu"})
    assert not hugepages.cpu_backend({"JAX_PLATFORMS": "tpu"})
    assert _run(JAX_PLATFORMS="cuda")[0] == "None"  # decided before JAX loads: no restart
