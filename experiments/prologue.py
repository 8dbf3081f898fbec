"""What every entry point does first, before JAX is imported: the process-wide switches.

    if __name__ == "__main__":  # first, before JAX loads
        from experiments import prologue
        prologue.start()

Process-wide switches belong to entry points, never to an import: a library user's process
is theirs. Today the one switch is transparent huge pages for XLA:CPU's host memory
(`fpt_jax.hugepages`: the process re-executes itself once with the glibc tunable set).
"""
from __future__ import annotations


def start() -> None:
    """The entry point's process-wide setup; must run before JAX is imported."""
    from fpt_jax import hugepages  # imports no JAX
    hugepages.reexec_with_huge_pages()
