"""Where the kernel sources are and how they compile: the one copy that ``setup.py`` (ahead of
time, loaded by path without importing torch) and :mod:`commlib._ext` (JIT) both read.

The flags keep the compiled kernels bit-identical to the Python references: no fused multiply-add
contraction, no trapping-math reordering (``-ffp-contract=off``, ``--fmad=false``).
"""

from __future__ import annotations

from pathlib import Path

CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
CPU_LINK_FLAGS = ["-fopenmp"]
CUDA_HOST_FLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "--fmad=false", "--expt-relaxed-constexpr"]


def source_root() -> Path | None:
    """The kernel sources: packaged copy (``commlib/_csrc``) or the repository's ``csrc``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "include" / "commlib" / "elementwise.h").is_file():
            return candidate
    return None


def cpu_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "cuda").glob("*.cu"))
