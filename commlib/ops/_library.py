"""How an op is defined: its schema, its pure-PyTorch reference (the default kernel on every device)
and its shape-only fake kernel, in one call made by the op's family module. Compiled CPU/CUDA
kernels (``csrc/``, loaded by :mod:`commlib._ext`) take over for their device through the dispatcher.
"""

from __future__ import annotations

from typing import Callable

import torch

from commlib import _ext

LIBRARY = torch.library.Library("commlib", "DEF")
SCHEMAS: dict[str, str] = {}  # op name -> schema, in definition order
REFERENCES: dict[str, Callable] = {}  # op name -> its pure-PyTorch reference


def define(schema: str, reference: Callable, fake: Callable) -> None:
    """Define ``commlib::<name>`` from ``schema``; ``reference`` becomes its CompositeExplicitAutograd
    kernel and ``fake`` its shape function (under torch.compile and FakeTensorMode)."""
    name = schema.split("(", 1)[0]
    if name in SCHEMAS:
        raise RuntimeError(f"commlib::{name} is defined twice")
    LIBRARY.define(schema)
    torch.library.impl(f"commlib::{name}", "CompositeExplicitAutograd")(reference)
    torch.library.register_fake(f"commlib::{name}")(fake)
    SCHEMAS[name] = schema
    REFERENCES[name] = reference


def dispatch(name: str, *args):
    """Call ``torch.ops.commlib.<name>`` once the compiled kernels had their chance to load."""
    _ext.ensure_loaded()
    return getattr(torch.ops.commlib, name).default(*args)
