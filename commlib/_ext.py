"""The one kernel loader: ahead-of-time ``commlib/_C*.so`` -> JIT build (cached) -> Python reference.

Environment toggles:

``COMMLIB_FORCE_PYTHON=1``  never load compiled kernels; every op runs its Python reference.
``COMMLIB_JIT=0``           do not JIT-build on first use (an AOT build is still loaded).
``COMMLIB_CACHE_DIR``       where JIT builds live (default ``~/.cache/commlib``).
``COMMLIB_VERBOSE_BUILD=1`` show the compiler's output.
``COMMLIB_CUDA_BACKEND``    CUDA tensors: ``auto`` (default: the torch extension if nvcc builds it,
                            else the references), ``extension``, ``cupy`` (no nvcc build:
                            ``csrc/cuda/kernels`` compiled at run time by NVRTC, see
                            :mod:`commlib.ops._cupy`; only when chosen, since no GPU run of
                            ``scripts/gpu_check.sh`` has passed with it yet) or ``reference``.

Nothing here raises: a missing compiler or a failed build is logged once and the Python
references (always registered, see ``commlib/ops``) serve every call. The dispatcher picks the
compiled kernel for a device when one is registered, so nothing else in commlib branches on this.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from commlib._build_config import (
    CPU_FLAGS,
    CPU_LINK_FLAGS,
    CUDA_FLAGS,
    CUDA_HOST_FLAGS,
    cpu_sources,
    cuda_sources,
    source_root,
)
from commlib.validation import one_of

log = logging.getLogger("commlib.ext")

_lock = threading.Lock()
_status: dict[str, str] = {}  # "cpu" / "cuda" -> "cpp" | "cuda" | "python"; "error" -> message



def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    return Path(os.environ.get("COMMLIB_CACHE_DIR", Path.home() / ".cache" / "commlib"))


def _build_name(kind: str, sources: list[str], root: Path) -> str:
    """A name that changes with the sources, the headers and the torch build, so caches never go stale."""
    digest = hashlib.sha256(torch.__version__.encode() + str(root).encode())
    headers = glob.glob(str(root / "**" / "*.h"), recursive=True) + glob.glob(str(root / "**" / "*.cuh"),
                                                                            recursive=True)
    for path in sorted(sources) + sorted(headers):
        digest.update(Path(path).read_bytes())
    return f"commlib_{kind}_{digest.hexdigest()[:12]}"


def _jit_build(kind: str, sources: list[str], root: Path, **kwargs) -> None:
    from torch.utils import cpp_extension

    name = _build_name(kind, sources, root)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # cpp_extension.load serialises concurrent builders on a lock file in build_dir, so ranks that
    # start together wait for the first one and then load its library.
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_include_paths=[str(root / "include")],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=_truthy("COMMLIB_VERBOSE_BUILD"),
        **kwargs,
    )


def _load_aot() -> bool:
    libs = glob.glob(str(Path(__file__).resolve().parent / "_C*.so"))
    for lib in libs:
        torch.ops.load_library(lib)
    return bool(libs)


def _load() -> None:
    if _truthy("COMMLIB_FORCE_PYTHON"):
        _status.update(cpu="python", cuda="python", reason="COMMLIB_FORCE_PYTHON=1")
        return
    try:
        if _load_aot():
            _status.update(cpu="cpp", reason="ahead-of-time build")
            if torch.version.cuda:
                _status["cuda"] = "cuda"
            return
    except Exception as exc:  # a stale .so from another torch: fall through to JIT
        log.warning("commlib: could not load the ahead-of-time kernels (%s); trying a JIT build", exc)
    if os.environ.get("COMMLIB_JIT", "1").strip() in ("0", "false", "no", "off"):
        _status.update(cpu="python", cuda="python", reason="COMMLIB_JIT=0 and no ahead-of-time build")
        return
    root = source_root()
    if root is None:
        _status.update(cpu="python", cuda="python", reason="kernel sources not found")
        log.warning("commlib: kernel sources not found; using the Python reference ops")
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _status.update(cpu="python", cuda="python", reason="no C++ compiler on PATH")
        log.warning("commlib: no C++ compiler found; using the Python reference ops")
        return
    try:
        _jit_build("cpu", cpu_sources(root), root, extra_cflags=CPU_FLAGS, extra_ldflags=CPU_LINK_FLAGS)
        _status.update(cpu="cpp", reason="JIT build")
    except Exception as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        _status.update(cpu="python", cuda="python", reason=f"CPU build failed: {detail}")
        log.warning("commlib: building the CPU kernels failed; using the Python reference ops\n%s", exc)
        return
    _status["cuda"] = "python"
    if torch.version.cuda and torch.cuda.is_available():
        _load_cuda(root)


CUDA_BACKENDS = ("auto", "extension", "cupy", "reference")


def cuda_backend_choice() -> str:
    choice = os.environ.get("COMMLIB_CUDA_BACKEND", "auto").strip().lower() or "auto"
    one_of("COMMLIB_CUDA_BACKEND", choice, CUDA_BACKENDS)
    return choice


def _load_cuda(root: Path) -> None:
    """The torch extension (nvcc); cupy/NVRTC only with COMMLIB_CUDA_BACKEND=cupy (status "cuda" / "cupy")."""
    choice = cuda_backend_choice()
    if choice == "reference":
        return
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if choice == "extension" or (choice == "auto" and nvcc):
        try:
            _jit_build("cuda", cuda_sources(root), root, extra_cflags=CUDA_HOST_FLAGS, extra_cuda_cflags=CUDA_FLAGS)
            _status["cuda"] = "cuda"
            return
        except Exception as exc:
            log.warning("commlib: building the CUDA kernels failed (%s)", exc)
            if choice == "extension":
                return
    if choice != "cupy":  # cupy/NVRTC only when chosen explicitly: it has not passed a GPU run yet
        return
    try:
        import cupy  # noqa: F401  (the launchers import it lazily; check it is there before choosing it)

        from commlib.ops import _cupy

        _cupy.register()
        _status["cuda"] = "cupy"
    except ImportError:
        log.warning("commlib: COMMLIB_CUDA_BACKEND=cupy but cupy is not installed; CUDA tensors use the "
                        "reference ops (pip install commlib[gpu])")


def ensure_loaded() -> dict[str, str]:
    """Load (or build) the compiled kernels once per process; returns the backend status."""
    if not _status:
        with _lock:
            if not _status:
                _load()
    return _status


def kernel_backend(device: str | torch.device = "cpu") -> str:
    """'cpp', 'cuda', 'cupy' or 'python': what runs commlib's ops on this device type (for logs and benchmarks)."""
    kind = torch.device(device).type
    return ensure_loaded().get(kind, "python")
