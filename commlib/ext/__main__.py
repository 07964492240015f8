"""Build commlib's kernels now (``build``) or print which backend serves each op (``info``)."""

import argparse
import sys
import time

import torch

from commlib import _ext
from commlib.ops import SCHEMAS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commlib.ext", description=__doc__)
    parser.add_argument("command", choices=["build", "info"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    status = _ext.ensure_loaded()
    elapsed = time.perf_counter() - start
    print(f"torch {torch.__version__}; kernel sources: {_ext.source_root()}; cache: {_ext.cache_dir()}")
    print(f"load: {status.get('reason', '')} ({elapsed:.1f} s)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in SCHEMAS:
        for device in devices:
            print(f"  commlib::{name:<16} {device:<5} {_ext.kernel_backend(device)}")
    if args.command == "build" and status.get("cpu") != "cpp":
        print("build failed: the Python reference ops are in use", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
