"""Compressors written as text, as on a command line: ``"QSGD(bits=4)"`` <-> ``QSGD(bits=4)``."""

from __future__ import annotations

import ast

from commlib.compress.base import Compressor
from commlib.compress.cast import Cast
from commlib.compress.identity import Identity
from commlib.compress.powersgd import PowerSGD
from commlib.compress.qsgd import QSGD
from commlib.compress.randomk import RandomK
from commlib.compress.sign import Sign
from commlib.compress.topk import TopK

COMPRESSORS = {cls.__name__: cls for cls in (Cast, Identity, PowerSGD, QSGD, RandomK, Sign, TopK)}


def from_string(text: str) -> Compressor:
    """The compressor ``text`` names, with keyword arguments as Python literals.

    ``text`` is a class of :mod:`commlib.compress` called with keyword arguments only; each value is
    parsed with :func:`ast.literal_eval` (numbers, strings, booleans, tuples, None), and a bare
    word is a string. Nothing else is evaluated. Raises ``ValueError`` naming the text when it does
    not parse or names no compressor; a bad argument raises the compressor's own ``ValueError``.

    Example::

        >>> from commlib import compress
        >>> compress.from_string("QSGD(bits=4, bucket_size=512)")
        QSGD(bits=4, bucket_size=512)
        >>> compress.from_string("TopK(density=0.01)").density
        0.01
    """
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"compressor text {text!r} is not a call like 'QSGD(bits=4)': {error.msg}") from None
    if isinstance(call, ast.Name):  # "Sign" means Sign()
        call = ast.Call(func=call, args=[], keywords=[])
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        raise ValueError(f"compressor text {text!r} must be a class name called with keyword arguments, "
                         "e.g. 'QSGD(bits=4)'")
    cls = COMPRESSORS.get(call.func.id)
    if cls is None:
        raise ValueError(f"compressor text {text!r} names no compressor; one of {', '.join(COMPRESSORS)}")
    kwargs = {}
    for keyword in call.keywords:
        if isinstance(keyword.value, ast.Name):  # a bare word is a string
            kwargs[keyword.arg] = keyword.value.id
            continue
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise ValueError(f"compressor text {text!r}: the value of {keyword.arg} must be a Python literal "
                             "or a bare word") from None
    return cls(**kwargs)
