"""CUDA kernels without a build step: the ``csrc/cuda/kernels/*.cuh`` sources compiled at run time by
NVRTC (through cupy) and launched on torch's current stream.

The kernel headers hold device code only and are the same text that nvcc compiles into the torch
extension (``csrc/cuda/*.cu`` include them); this module is the host side for cupy, a line-for-line
twin of those ``.cu`` launchers: the same checks, the same output allocations (by torch's caching
allocator, so outputs are ordinary tensors), the same grids. Arguments go to the kernels as raw
device pointers (``data_ptr``; no copies, no cupy arrays) and scalars of the kernels' exact types.
Launches go on ``torch.cuda.current_stream()`` wrapped as a ``cupy.cuda.ExternalStream``, so
ordering against torch's work is the stream's own order.

Selected by ``COMMLIB_CUDA_BACKEND=cupy``, or automatically (``auto``) when CUDA is available, the
torch extension is not built and cupy is installed: see :mod:`commlib._ext`.

**Execution is untested**: no GPU has run this module yet. CI compiles every kernel source through
NVRTC for sm_80 and sm_90 (:func:`compile_offline`, no GPU needed) and ``scripts/gpu_check.sh``
runs the op tests on this backend the day a GPU is available.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from commlib._build_config import source_root
from commlib.ops._common import seed_key

FLOATS = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
INDICES = {torch.int32: "int32_t", torch.int64: "int64_t"}
THREADS = 256  # kernels::kThreads in csrc/cuda/kernels/device.cuh


def _k(name: str, *types: str) -> str:
    return f"commlib::kernels::{name}<{', '.join(types)}>" if types else f"commlib::kernels::{name}"


def _each(name: str, *groups) -> list[str]:
    out = [[]]
    for group in groups:
        out = [prefix + [t] for prefix in out for t in group]
    return [_k(name, *types) for types in out]


_F, _I = list(FLOATS.values()), list(INDICES.values())
# every kernel instantiation a launcher below can ask for, per kernel header
NAME_EXPRESSIONS: dict[str, list[str]] = {
    "sign": [*_each("sign_pack_kernel", _F), _k("finish_scales_kernel"), *_each("sign_unpack_kernel", _F)],
    "qsgd": [*_each("qsgd_quantize_kernel", _F), *_each("qsgd_dequantize_kernel", _F)],
    "ef": [*_each("ef_sign_pack_kernel", _F), _k("ef_finish_scales_kernel"), *_each("ef_sign_residual_kernel", _F),
           *_each("sign_unpack_into_kernel", _F, _F), *_each("ef_qsgd_quantize_kernel", _F),
           *_each("ef_qsgd_residual_kernel", _F), *_each("qsgd_dequantize_into_kernel", _F, _F),
           *_each("ef_accumulate_kernel", _F), *_each("ef_subtract_sent_kernel", _F, _I),
           *_each("ef_gather_kernel", _F, _I), *_each("ef_nonfinite_kernel", _F), _k("ef_guard_kernel")],
    "powersgd": [_k("powersgd_project_kernel"), _k("powersgd_backproject_kernel")],
}


# ---------------------------------------------------------------------------------------- compiling
def kernel_dir() -> Path:
    root = source_root()
    if root is None:
        raise FileNotFoundError("commlib's kernel sources (csrc/) are not installed")
    return root


def cuda_include_dirs() -> list[str]:
    """Where ``cuda_fp16.h`` / ``cuda_bf16.h`` are: the CUDA 13 wheel layout (``nvidia/cu13/include``),
    the CUDA 12 one (``nvidia/cuda_runtime/include``), ``CUDA_PATH``/``CUDA_HOME``, or ``/usr/local/cuda``."""
    found = []
    try:
        import nvidia

        for base in map(Path, nvidia.__path__):
            found += [str(d) for d in (base / "cu13" / "include", base / "cuda_runtime" / "include")
                      if (d / "cuda_fp16.h").is_file()]
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            found.append(str(Path(os.environ[env]) / "include"))
    found.append("/usr/local/cuda/include")
    return [d for d in dict.fromkeys(found) if (Path(d) / "cuda_fp16.h").is_file()]


def nvrtc_options(arch: str | None = None) -> list[str]:
    """NVRTC flags matching the extension's nvcc flags (``--fmad=false``: no contraction, so results
    match the references bit for bit)."""
    root = kernel_dir()
    options = ["--std=c++17", "--fmad=false", "-I" + str(root / "include"), "-I" + str(root / "cuda" / "kernels")]
    options += ["-I" + d for d in cuda_include_dirs()]
    if arch is not None:
        options.append(f"-arch={arch}")
    return options


def program_source(module: str) -> str:
    return f'#include "{module}.cuh"\n'


def compile_offline(module: str, arch: str = "sm_90") -> tuple[bytes, dict[str, str]]:
    """Compile one kernel header with NVRTC's C API (no GPU or driver needed); returns the binary
    (a cubin for ``sm_XX``, PTX for ``compute_XX``) and each name expression's lowered (mangled) name.
    Raises ``RuntimeError`` with NVRTC's log when the source does not compile."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(program_source(module), f"{module}.cu", (), ())
    try:
        for name in NAME_EXPRESSIONS[module]:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, tuple(nvrtc_options(arch)))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {module}.cuh for {arch}: {exc}\n"
                               f"{nvrtc.getProgramLog(program)}") from exc
        lowered = {name: nvrtc.getLoweredName(program, name) for name in NAME_EXPRESSIONS[module]}
        binary = nvrtc.getCUBIN(program) if arch.startswith("sm_") else nvrtc.getPTX(program).encode()
        return binary, lowered
    finally:
        nvrtc.destroyProgram(program)


@functools.cache
def _module(module: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=program_source(module), options=tuple(nvrtc_options()),
                              name_expressions=tuple(NAME_EXPRESSIONS[module]))


def _launch(module: str, name: str, device: torch.device, grid: int, args: tuple, shared: int = 0,
            threads: int = THREADS) -> None:
    """``name<<<grid, threads, shared, torch's current stream>>>(*args)``."""
    import cupy

    if grid <= 0:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(module, index).get_function(name)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        kernel((grid,), (threads,), args, shared_mem=shared)


# ---------------------------------------------------------------------------------------- arguments
def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _blocks(work: int) -> int:
    return (work + THREADS - 1) // THREADS


def _chunk_of(chunk_size: int, numel: int) -> int:
    return max(numel, 1) if chunk_size == 0 or chunk_size >= numel else chunk_size


def _float_name(dtype: torch.dtype, op: str) -> str:
    if dtype not in FLOATS:
        raise RuntimeError(f"commlib::{op}: expected float32, bfloat16 or float16, got {dtype}")
    return FLOATS[dtype]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _check_pair(op: str, grad: torch.Tensor, residual: torch.Tensor | None) -> None:
    _check(grad.is_cuda and grad.is_contiguous(), f"{op}: expected a contiguous CUDA tensor")
    if residual is not None:
        _check(residual.dtype == grad.dtype and residual.numel() == grad.numel() and residual.is_contiguous()
               and residual.device == grad.device,
               f"{op}: residual must match grad's dtype, size and device, and be contiguous")


def _check_devices(op: str, like: torch.Tensor, *others) -> None:
    """Every tensor on ``like``'s device (a host tensor would hand the kernel a host pointer)."""
    for t in others:
        if t is not None:
            _check(t.device == like.device, f"{op}: every tensor must be on {like.device}, got one on {t.device}")


def _sign_scale_count(chunk_size: int, numel: int) -> int:
    return 0 if numel == 0 else -(-numel // _chunk_of(chunk_size, numel))


def _check_scales(op: str, scales: torch.Tensor, expected: int) -> None:
    _check(scales.dtype == torch.float32 and scales.numel() == expected,
           f"{op}: expected {expected} float32 scales, got {scales.numel()} of {scales.dtype}")


def _check_qsgd(op: str, bits: int, bucket_size: int) -> None:
    _check(1 <= bits <= 8 and bucket_size >= 8 and bucket_size % 8 == 0, f"{op}: bad bits or bucket_size")


# ---------------------------------------------------------------------------------------- sign.cu
def _sign_outputs(numel: int, chunk_size: int, device: torch.device):
    """The chunking and the outputs of a sign pack of ``numel`` values: (words, chunk, chunks,
    packed, per-chunk float64 |x| sums, scales)."""
    words = (numel + 31) // 32
    chunk = _chunk_of(chunk_size, numel)
    chunks = 0 if numel == 0 else (numel + chunk - 1) // chunk
    return (words, chunk, chunks, torch.empty(words, dtype=torch.int32, device=device),
            torch.zeros(chunks, dtype=torch.float64, device=device),
            torch.empty(chunks, dtype=torch.float32, device=device))


def sign_pack(x: torch.Tensor, chunk_size: int):
    _check(x.is_cuda, "commlib::sign_pack: expected a CUDA tensor")
    _check(chunk_size >= 0 and chunk_size % 32 == 0, f"commlib::sign_pack: bad chunk_size {chunk_size}")
    x = x.contiguous().view(-1)
    n = x.numel()
    words, chunk, chunks, packed, sums, scales = _sign_outputs(n, chunk_size, x.device)
    if n == 0:
        return packed, scales
    t = _float_name(x.dtype, "sign_pack")
    _launch("sign", _k("sign_pack_kernel", t), x.device, _blocks(words),
            (_ptr(x), _i64(n), _i64((chunk + 31) // 32), _ptr(packed), _ptr(sums)))
    _launch("sign", _k("finish_scales_kernel"), x.device, _blocks(chunks),
            (_ptr(sums), _i64(chunks), _i64(chunk), _i64(n), _ptr(scales)))
    return packed, scales


def sign_unpack(packed, scales, numel: int, chunk_size: int, dtype: torch.dtype):
    _check(packed.is_cuda and scales.is_cuda, "commlib::sign_unpack: expected CUDA tensors")
    _check_devices("commlib::sign_unpack", packed, scales)
    _check(packed.dtype == torch.int32 and scales.dtype == torch.float32,
           "commlib::sign_unpack: packed must be int32 and scales float32")
    _check(packed.numel() == (numel + 31) // 32, "commlib::sign_unpack: packed size does not match numel")
    chunk = _chunk_of(chunk_size, numel)
    chunks = 0 if numel == 0 else (numel + chunk - 1) // chunk
    _check(scales.numel() == chunks, f"commlib::sign_unpack: expected {chunks} scales")
    packed, scales = packed.contiguous(), scales.contiguous()
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel:
        _launch("sign", _k("sign_unpack_kernel", _float_name(dtype, "sign_unpack")), packed.device, _blocks(numel),
                (_ptr(packed), _ptr(scales), _i64(numel), _i64(chunk), _ptr(out)))
    return out


# ---------------------------------------------------------------------------------------- qsgd.cu
def qsgd_quantize(x: torch.Tensor, bits: int, bucket_size: int, seed: int):
    _check(x.is_cuda, "commlib::qsgd_quantize: expected a CUDA tensor")
    _check_qsgd("commlib::qsgd_quantize", bits, bucket_size)
    x = x.contiguous().view(-1)
    n = x.numel()
    buckets = (n + bucket_size - 1) // bucket_size
    codes = torch.empty((n + 7) // 8 * bits, dtype=torch.uint8, device=x.device)
    scales = torch.empty(buckets, dtype=torch.float32, device=x.device)
    if n:
        _launch("qsgd", _k("qsgd_quantize_kernel", _float_name(x.dtype, "qsgd_quantize")), x.device, buckets,
                (_ptr(x), _i64(n), _i32(bits), _i64(bucket_size), np.uint32(seed_key(seed)), _ptr(codes),
                 _ptr(scales)))
    return codes, scales


def qsgd_dequantize(codes, scales, bits: int, bucket_size: int, numel: int, dtype: torch.dtype):
    _check_qsgd("commlib::qsgd_dequantize", bits, bucket_size)
    _check(codes.is_cuda and scales.is_cuda, "commlib::qsgd_dequantize: expected CUDA tensors")
    _check_devices("commlib::qsgd_dequantize", codes, scales)
    _check(codes.dtype == torch.uint8 and scales.dtype == torch.float32,
           "commlib::qsgd_dequantize: codes must be uint8 and scales float32")
    _check(codes.numel() == (numel + 7) // 8 * bits, "commlib::qsgd_dequantize: code bytes do not match numel")
    _check(scales.numel() == (numel + bucket_size - 1) // bucket_size,
           "commlib::qsgd_dequantize: wrong number of scales")
    codes, scales = codes.contiguous(), scales.contiguous()
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        _launch("qsgd", _k("qsgd_dequantize_kernel", _float_name(dtype, "qsgd_dequantize")), codes.device,
                _blocks((numel + 7) // 8), (_ptr(codes), _ptr(scales), _i32(bits), _i64(bucket_size), _i64(numel),
                                            _ptr(out)))
    return out


# ---------------------------------------------------------------------------------------- ef.cu
def ef_sign_pack(grad, residual, chunk_size: int, numel: int):
    _check_pair("commlib::ef_sign_pack", grad, residual)
    _check(chunk_size >= 0 and chunk_size % 32 == 0 and numel >= grad.numel(),
           "commlib::ef_sign_pack: bad chunk_size or numel")
    words, chunk, chunks, packed, sums, scales = _sign_outputs(numel, chunk_size, grad.device)
    if numel == 0:
        return packed, scales
    t = _float_name(grad.dtype, "ef_sign_pack")
    _launch("ef", _k("ef_sign_pack_kernel", t), grad.device, _blocks(words),
            (_ptr(grad), _ptr(residual), _i64(grad.numel()), _i64(numel), _i64((chunk + 31) // 32), _ptr(packed),
             _ptr(sums)))
    _launch("ef", _k("ef_finish_scales_kernel"), grad.device, _blocks(chunks),
            (_ptr(sums), _i64(chunks), _i64(chunk), _i64(numel), _ptr(scales)))
    return packed, scales


def ef_sign_residual_(residual, grad, packed, scales, chunk_size: int, numel: int, accumulate: bool) -> None:
    _check_pair("commlib::ef_sign_residual_", grad, residual)
    _check(packed.numel() == (numel + 31) // 32 and numel >= grad.numel() and packed.is_contiguous()
           and scales.is_contiguous(), "commlib::ef_sign_residual_: payload does not match numel")
    _check_devices("commlib::ef_sign_residual_", grad, residual, packed, scales)
    _check_scales("commlib::ef_sign_residual_", scales, _sign_scale_count(chunk_size, numel))
    n = grad.numel()
    if n:
        _launch("ef", _k("ef_sign_residual_kernel", _float_name(grad.dtype, "ef_sign_residual_")), grad.device,
                _blocks(n), (_ptr(residual), _ptr(grad), _i64(n), _ptr(packed), _ptr(scales),
                             _i64(_chunk_of(chunk_size, numel)), np.bool_(accumulate)))


def sign_unpack_into_(out, packed, scales, chunk_size: int, numel: int, dtype: torch.dtype, accumulate: bool) -> None:
    _check(out.is_cuda and out.is_contiguous() and out.numel() <= numel and packed.numel() == (numel + 31) // 32
           and packed.is_contiguous() and scales.is_contiguous(),
           "commlib::sign_unpack_into_: out must be contiguous CUDA with at most numel elements")
    _check_devices("commlib::sign_unpack_into_", out, packed, scales)
    _check_scales("commlib::sign_unpack_into_", scales, _sign_scale_count(chunk_size, numel))
    n = out.numel()
    if n:
        types = (_float_name(out.dtype, "sign_unpack_into_"), _float_name(dtype, "sign_unpack_into_"))
        _launch("ef", _k("sign_unpack_into_kernel", *types), out.device, _blocks(n),
                (_ptr(out), _i64(n), _ptr(packed), _ptr(scales), _i64(_chunk_of(chunk_size, numel)),
                 np.bool_(accumulate)))


def ef_qsgd_quantize(grad, residual, bits: int, bucket_size: int, seed: int, numel: int):
    _check_pair("commlib::ef_qsgd_quantize", grad, residual)
    _check_qsgd("commlib::ef_qsgd_quantize", bits, bucket_size)
    _check(numel >= grad.numel(), "commlib::ef_qsgd_quantize: numel is below grad's")
    buckets = (numel + bucket_size - 1) // bucket_size
    codes = torch.empty((numel + 7) // 8 * bits, dtype=torch.uint8, device=grad.device)
    scales = torch.empty(buckets, dtype=torch.float32, device=grad.device)
    if numel:
        _launch("ef", _k("ef_qsgd_quantize_kernel", _float_name(grad.dtype, "ef_qsgd_quantize")), grad.device,
                buckets, (_ptr(grad), _ptr(residual), _i64(grad.numel()), _i64(numel), _i32(bits),
                          _i64(bucket_size), np.uint32(seed_key(seed)), _ptr(codes), _ptr(scales)))
    return codes, scales


def ef_qsgd_residual_(residual, grad, codes, scales, bits: int, bucket_size: int, numel: int,
                      accumulate: bool) -> None:
    _check_pair("commlib::ef_qsgd_residual_", grad, residual)
    _check_qsgd("commlib::ef_qsgd_residual_", bits, bucket_size)
    _check(codes.numel() == (numel + 7) // 8 * bits and numel >= grad.numel() and codes.is_contiguous()
           and scales.is_contiguous(), "commlib::ef_qsgd_residual_: payload does not match numel")
    _check_devices("commlib::ef_qsgd_residual_", grad, residual, codes, scales)
    _check_scales("commlib::ef_qsgd_residual_", scales, -(-numel // bucket_size))
    n = grad.numel()
    if n:
        _launch("ef", _k("ef_qsgd_residual_kernel", _float_name(grad.dtype, "ef_qsgd_residual_")), grad.device,
                _blocks(n), (_ptr(residual), _ptr(grad), _i64(n), _ptr(codes), _ptr(scales), _i32(bits),
                             _i64(bucket_size), np.bool_(accumulate)))


def qsgd_dequantize_into_(out, codes, scales, bits: int, bucket_size: int, numel: int, dtype: torch.dtype,
                          accumulate: bool) -> None:
    _check_qsgd("commlib::qsgd_dequantize_into_", bits, bucket_size)
    _check(out.is_cuda and out.is_contiguous() and out.numel() <= numel and codes.numel() == (numel + 7) // 8 * bits
           and codes.is_contiguous() and scales.is_contiguous(),
           "commlib::qsgd_dequantize_into_: out must be contiguous CUDA with at most numel elements")
    _check_devices("commlib::qsgd_dequantize_into_", out, codes, scales)
    _check_scales("commlib::qsgd_dequantize_into_", scales, -(-numel // bucket_size))
    n = out.numel()
    if n:
        types = (_float_name(out.dtype, "qsgd_dequantize_into_"), _float_name(dtype, "qsgd_dequantize_into_"))
        _launch("ef", _k("qsgd_dequantize_into_kernel", *types), out.device, _blocks(n),
                (_ptr(out), _i64(n), _ptr(codes), _ptr(scales), _i32(bits), _i64(bucket_size), np.bool_(accumulate)))


def _index_name(dtype: torch.dtype, op: str) -> str:
    if dtype not in INDICES:
        raise RuntimeError(f"commlib::{op}: indices must be int32 or int64, got {dtype}")
    return INDICES[dtype]


def ef_sparse_residual_(residual, grad, indices, values, accumulate: bool) -> None:
    _check_pair("commlib::ef_sparse_residual_", grad, residual)
    _check(values.dtype == grad.dtype and values.numel() == indices.numel(),
           "commlib::ef_sparse_residual_: values must match grad's dtype and the indices' count")
    _check_devices("commlib::ef_sparse_residual_", grad, residual, indices, values)
    indices, values = indices.contiguous(), values.contiguous()
    n, k = grad.numel(), indices.numel()
    t = _float_name(grad.dtype, "ef_sparse_residual_")
    i = _index_name(indices.dtype, "ef_sparse_residual_")
    if n:
        _launch("ef", _k("ef_accumulate_kernel", t), grad.device, _blocks(n),
                (_ptr(residual), _ptr(grad), _i64(n), np.bool_(accumulate)))
    if k:  # one thread walks the pairs in order (repeated padding indices subtract in turn)
        _launch("ef", _k("ef_subtract_sent_kernel", t, i), grad.device, 1,
                (_ptr(residual), _ptr(indices), _ptr(values), _i64(k), _i64(n)), threads=1)


def ef_gather(grad, residual, indices):
    _check_pair("commlib::ef_gather", grad, residual)
    _check_devices("commlib::ef_gather", grad, indices)
    indices = indices.contiguous()
    n, k = grad.numel(), indices.numel()
    values = torch.empty(k, dtype=grad.dtype, device=grad.device)
    worst = torch.zeros(1, dtype=torch.int32, device=grad.device)
    guard = torch.empty((), dtype=torch.float32, device=grad.device)
    t = _float_name(grad.dtype, "ef_gather")
    i = _index_name(indices.dtype, "ef_gather")
    if n:
        _launch("ef", _k("ef_nonfinite_kernel", t), grad.device, _blocks(n),
                (_ptr(grad), _ptr(residual), _i64(n), _ptr(worst)))
    _launch("ef", _k("ef_guard_kernel"), grad.device, 1, (_ptr(worst), _ptr(guard)))
    if k:
        _launch("ef", _k("ef_gather_kernel", t, i), grad.device, _blocks(k),
                (_ptr(grad), _ptr(residual), _ptr(indices), _i64(k), _i64(n), _ptr(values)))
    return values, guard


# ---------------------------------------------------------------------------------------- powersgd.cu
def _check_matrices(op: str, m, q) -> None:
    _check(m.is_cuda and q.is_cuda and m.dtype == torch.float32 and q.dtype == torch.float32,
           f"{op}: expected float32 CUDA tensors")
    _check(m.dim() == 2 and q.dim() == 2 and q.shape[0] == m.shape[1] and m.is_contiguous(),
           f"{op}: M (rows x cols, contiguous) and Q (cols x r) do not chain")


def powersgd_project(grad, residual, q, m):
    _check_matrices("commlib::powersgd_project", grad, q)
    _check(m.shape == grad.shape and m.is_contiguous() and m.dtype == torch.float32,
           "commlib::powersgd_project: m must be a contiguous float32 matrix shaped like grad")
    if residual is not None:
        _check(residual.shape == grad.shape and residual.is_contiguous() and residual.dtype == torch.float32,
               "commlib::powersgd_project: residual must be a contiguous float32 matrix shaped like grad")
    _check_devices("commlib::powersgd_project", grad, q, m, residual)
    q = q.contiguous()
    rows, cols, r = grad.shape[0], grad.shape[1], q.shape[1]
    p = torch.empty(rows, r, dtype=grad.dtype, device=grad.device)
    if rows and r:
        _launch("powersgd", _k("powersgd_project_kernel"), grad.device, rows,
                (_ptr(grad), _ptr(residual), _ptr(q), _i64(cols), _i64(r), _ptr(m), _ptr(p)), shared=r * THREADS * 4)
    return p


def powersgd_backproject_(m, p, q, out) -> None:
    _check_matrices("commlib::powersgd_backproject_", m, q)
    _check(out.shape == m.shape and out.is_contiguous() and out.dtype == torch.float32,
           "commlib::powersgd_backproject_: out must be a contiguous float32 matrix shaped like m")
    _check_devices("commlib::powersgd_backproject_", m, p, q, out)
    p, q = p.contiguous(), q.contiguous()
    rows, cols, r = m.shape[0], m.shape[1], q.shape[1]
    _check(p.dim() == 2 and p.shape[0] == rows and p.shape[1] == r, "commlib::powersgd_backproject_: bad p shape")
    if rows * cols and r:
        _launch("powersgd", _k("powersgd_backproject_kernel"), m.device, _blocks(rows * cols),
                (_ptr(m), _ptr(p), _ptr(q), _i64(rows), _i64(cols), _i64(r), _ptr(out)))


# the ops this backend serves (the same set as the extension's TORCH_LIBRARY_IMPL(commlib, CUDA))
OPS = {f.__name__: f for f in (sign_pack, sign_unpack, qsgd_quantize, qsgd_dequantize, ef_sign_pack,
                                ef_sign_residual_, sign_unpack_into_, ef_qsgd_quantize, ef_qsgd_residual_,
                                qsgd_dequantize_into_, ef_sparse_residual_, ef_gather, powersgd_project,
                                powersgd_backproject_)}
_library = None


def register() -> None:
    """Register :data:`OPS` as the CUDA kernels of ``torch.ops.commlib`` (idempotent)."""
    global _library
    if _library is not None:
        return
    library = torch.library.Library("commlib", "IMPL")
    for name, fn in OPS.items():
        library.impl(name, fn, "CUDA")
    _library = library
