"""Build toggles (environment variables):

COMMLIB_BUILD_EXT=1   build the C++ CPU kernels (and CUDA kernels when torch has CUDA and CUDA_HOME
                      is set) ahead of time as commlib/_C*.so. Needs torch importable at build time:
                      ``COMMLIB_BUILD_EXT=1 pip install -e . --no-build-isolation``.
(default)             pure-Python install; kernels JIT-build on first use (see commlib/_ext.py).

The kernel sources (csrc/) are copied into the package as commlib/_csrc so a non-editable install
can JIT-build them too.
"""

import os
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# the compiler flags the JIT loader uses too, read without importing commlib (and torch)
BUILD = runpy.run_path(str(ROOT / "commlib" / "_build_config.py"))


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "commlib" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def extensions():
    if os.environ.get("COMMLIB_BUILD_EXT", "0") != "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    include = [str(ROOT / "csrc" / "include")]
    cpu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    flags = {"cxx": BUILD["CPU_FLAGS"]}
    if torch.version.cuda and cpp_extension.CUDA_HOME is not None:
        cuda = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        flags["nvcc"] = BUILD["CUDA_FLAGS"]
        ext = cpp_extension.CUDAExtension(
            "commlib._C", cpu + cuda, include_dirs=include, extra_compile_args=flags,
            extra_link_args=BUILD["CPU_LINK_FLAGS"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "commlib._C", cpu, include_dirs=include, extra_compile_args=flags, extra_link_args=BUILD["CPU_LINK_FLAGS"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, ext_cmds = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmds})
