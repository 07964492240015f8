"""The cupy/NVRTC backend for CUDA tensors, as far as a machine without a GPU can check it:

* every kernel header compiles through NVRTC for sm_80 and sm_90, with every instantiation the
  launchers ask for (CI sets ``COMMLIB_REQUIRE_NVRTC=1``: a missing NVRTC fails instead of skipping);
* the backend covers exactly the ops the nvcc extension registers for CUDA, with the schemas' arguments;
* every launch passes as many arguments as the kernel has parameters, each of the kernel's C type
  (pointers as 64-bit addresses, ``int64_t``/``int``/``uint32_t``/``bool`` scalars), found by
  running the launchers with the launch itself recorded instead of sent to a GPU.

Executing the kernels needs a GPU: ``scripts/gpu_check.sh``.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from commlib.ops import _cupy

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "csrc" / "cuda" / "kernels"


def nvrtc_or_skip():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the NVRTC library missing
        if os.environ.get("COMMLIB_REQUIRE_NVRTC") == "1":
            pytest.fail(f"COMMLIB_REQUIRE_NVRTC=1 but NVRTC is unavailable: {exc}")
        pytest.skip(f"NVRTC unavailable (pip install -e .[gpu]): {exc}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("module", sorted(_cupy.NAME_EXPRESSIONS))
def test_every_kernel_header_compiles_through_nvrtc(module, arch):
    nvrtc_or_skip()
    cubin, lowered = _cupy.compile_offline(module, arch)
    assert cubin[:4] == b"\x7fELF"  # a real device binary for that architecture
    assert set(lowered) == set(_cupy.NAME_EXPRESSIONS[module])
    assert all(name.startswith("_Z") for name in lowered.values())  # each instantiation exists, mangled


def kernel_signatures() -> dict[str, list[str]]:
    """``__global__`` kernel name -> its parameters' C types, read from the headers."""
    found = {}
    for header in KERNELS.glob("*.cuh"):
        text = header.read_text()
        for name, params in re.findall(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", text):
            types = []
            for param in params.split(","):
                param = param.replace("__restrict__", "").replace("const", "").strip()
                types.append("ptr" if "*" in param else param.rsplit(None, 1)[0])
            found[name] = types
    return found


def test_name_expressions_cover_every_kernel():
    declared = set(kernel_signatures())
    asked = {re.match(r"commlib::kernels::(\w+)", n).group(1) for names in _cupy.NAME_EXPRESSIONS.values()
             for n in names}
    assert declared == asked


def test_the_backend_serves_exactly_the_extensions_cuda_ops_with_their_schemas():
    registered = set()
    for source in (ROOT / "csrc" / "cuda").glob("*.cu"):
        registered |= set(re.findall(r'm\.impl\("(\w+)"', source.read_text()))
    assert set(_cupy.OPS) == registered
    from commlib.ops import SCHEMAS

    for name, fn in _cupy.OPS.items():
        schema = torch._C.parse_schema("commlib::" + SCHEMAS[name])
        assert list(inspect.signature(fn).parameters) == [a.name for a in schema.arguments], name


SCALAR = {"int64_t": np.int64, "int": np.int32, "uint32_t": np.uint32, "bool": np.bool_, "ptr": np.uint64}


def record_launches(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(_cupy, "_launch", lambda module, name, device, grid, args, shared=0, threads=256:
                        calls.append((module, name, grid, args, shared, threads)))
    monkeypatch.setattr(_cupy, "_check", lambda ok, message: None)  # CPU tensors stand in for CUDA ones
    return calls


CASES = [
    ("sign_pack", lambda: (torch.randn(100), 64)),
    ("sign_unpack", lambda: (torch.zeros(4, dtype=torch.int32), torch.ones(2), 100, 64, torch.bfloat16)),
    ("qsgd_quantize", lambda: (torch.randn(100, dtype=torch.float16), 4, 64, 3)),
    ("qsgd_dequantize", lambda: (torch.zeros(52, dtype=torch.uint8), torch.ones(2), 4, 64, 100, torch.float32)),
    ("ef_sign_pack", lambda: (torch.randn(100), torch.randn(100), 64, 128)),
    ("ef_sign_residual_", lambda: (torch.randn(100), torch.randn(100), torch.zeros(4, dtype=torch.int32),
                                   torch.ones(2), 64, 128, True)),
    ("sign_unpack_into_", lambda: (torch.zeros(100), torch.zeros(4, dtype=torch.int32), torch.ones(2), 64, 128,
                                   torch.float16, False)),
    ("ef_qsgd_quantize", lambda: (torch.randn(100), None, 2, 64, 1, 128)),
    ("ef_qsgd_residual_", lambda: (torch.randn(100), torch.randn(100), torch.zeros(32, dtype=torch.uint8),
                                   torch.ones(2), 2, 64, 128, True)),
    ("qsgd_dequantize_into_", lambda: (torch.zeros(100, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.uint8),
                                       torch.ones(2), 2, 64, 128, torch.float32, True)),
    ("ef_sparse_residual_", lambda: (torch.randn(100), torch.randn(100), torch.tensor([3, 5]), torch.ones(2), True)),
    ("ef_gather", lambda: (torch.randn(100), torch.randn(100), torch.tensor([3, 5], dtype=torch.int32))),
    ("powersgd_project", lambda: (torch.randn(6, 5), None, torch.randn(5, 2), torch.empty(6, 5))),
    ("powersgd_backproject_", lambda: (torch.randn(6, 5), torch.randn(6, 2), torch.randn(5, 2), torch.empty(6, 5))),
]


@pytest.mark.parametrize("op,make_args", CASES, ids=[c[0] for c in CASES])
def test_every_launch_matches_its_kernels_parameters(monkeypatch, op, make_args):
    calls = record_launches(monkeypatch)
    _cupy.OPS[op](*make_args())
    assert calls, f"{op} launched nothing"
    signatures = kernel_signatures()
    for module, name, grid, args, _shared, threads in calls:
        assert name in _cupy.NAME_EXPRESSIONS[module], f"{name} is not compiled into {module}"
        params = signatures[re.match(r"commlib::kernels::(\w+)", name).group(1)]
        assert len(args) == len(params), (name, args, params)
        for arg, param in zip(args, params, strict=True):
            assert type(arg) is SCALAR[param], (name, param, type(arg))
        assert grid >= 1 and threads in (1, 256)


def test_powersgd_project_reserves_the_shared_memory_its_kernel_indexes(monkeypatch):
    calls = record_launches(monkeypatch)
    _cupy.powersgd_project(torch.randn(6, 5), None, torch.randn(5, 3), torch.empty(6, 5))
    # one block per row, r x blockDim floats of shared memory
    assert [(grid, shared) for _, _, grid, _, shared, _ in calls] == [(6, 3 * 256 * 4)]


def test_register_installs_a_cuda_kernel_for_every_op():
    code = ("import torch, commlib.ops\nfrom commlib.ops import _cupy\n_cupy.register()\n"
            "print(all(torch._C._dispatch_has_kernel_for_dispatch_key('commlib::' + n, 'CUDA') for n in _cupy.OPS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, COMMLIB_FORCE_PYTHON="1"))
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_a_bad_backend_name_is_refused(monkeypatch):
    from commlib import _ext

    monkeypatch.setenv("COMMLIB_CUDA_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="COMMLIB_CUDA_BACKEND"):
        _ext.cuda_backend_choice()


def test_the_launchers_validation_layer_refuses_foreign_devices_and_wrong_scale_counts():
    """The checks every cupy launcher runs before a launch (the .cu launchers have their twins,
    check_device and check_scales in csrc/cuda/common.cuh): a tensor on another device (a residual
    loaded with map_location="cpu") and a payload with the wrong number of scales are refused."""
    here, elsewhere = torch.zeros(4), torch.zeros(4, device="meta")
    _cupy._check_devices("op", here, here, None)
    with pytest.raises(RuntimeError, match="every tensor must be on cpu"):
        _cupy._check_devices("op", here, here, elsewhere)
    assert [_cupy._sign_scale_count(c, n) for c, n in [(0, 100), (64, 128), (64, 129), (64, 0)]] == [1, 2, 3, 0]
    _cupy._check_scales("op", torch.ones(2), 2)
    for scales in (torch.ones(3), torch.ones(2, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="expected 2 float32 scales"):
            _cupy._check_scales("op", scales, 2)


@pytest.mark.parametrize("op,make_args,message", [
    ("ef_sign_residual_", lambda: (torch.randn(100), torch.randn(100), torch.zeros(4, dtype=torch.int32),
                                   torch.ones(3), 64, 128, True), "scales"),
    ("ef_qsgd_residual_", lambda: (torch.randn(100), torch.randn(100), torch.zeros(32, dtype=torch.uint8),
                                   torch.ones(1), 2, 64, 128, True), "scales"),
    ("ef_sparse_residual_", lambda: (torch.randn(100), torch.randn(100), torch.tensor([3, 5], device="meta"),
                                     torch.ones(2), True), "every tensor"),
    ("powersgd_project", lambda: (torch.randn(6, 5), None, torch.randn(5, 2, device="meta"), torch.empty(6, 5)),
     "every tensor"),
])
def test_launchers_run_their_checks(monkeypatch, op, make_args, message):
    """The launchers themselves refuse: CPU tensors stand in for CUDA ones (only the is-CUDA test is
    lifted), the bad argument is the scales or a tensor on another device."""
    real = _cupy._check
    monkeypatch.setattr(_cupy, "_check", lambda ok, text: None if "CUDA" in text else real(ok, text))
    monkeypatch.setattr(_cupy, "_launch", lambda *args, **kwargs: pytest.fail("launched despite bad arguments"))
    with pytest.raises(RuntimeError, match=message):
        _cupy.OPS[op](*make_args())
