"""Read CIFAR's pickled batches without running code: an unpickler that builds plain data only.

The CIFAR archives hold Python pickles, and a pickle can call any importable function
while it loads. A user's own archive (`data.source` with `data.md5`) is vouched for by no
published checksum, so every batch is read with an unpickler that resolves exactly the
globals the real archives need (numpy's array reconstruction of a `numpy.ndarray`, which
the pickle names but may not call: called, it builds an array over any bytes, object
pointers included; `numpy.dtype` without object fields, and the `_codecs.encode` that Python 3's protocol 2
uses for bytes; numpy's `_frombuffer` for arrays pickled with protocol 5) and refuses any
other with a one-line error naming the file. Dicts, lists, tuples, text, bytes and numbers
come from pickle opcodes, which need no globals.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from ..errors import UserError

try:  # numpy 2 moved numpy.core to numpy._core (pickles name either)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct


class Refused(pickle.UnpicklingError):
    """What the pickle asks for and this unpickler will not build (the message names it)."""


def _dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise Refused("an array of Python objects")
    return dtype


class _Ndarray:
    """numpy.ndarray as the pickle sees it: `_reconstruct_array` accepts it, a call is refused
    (`numpy.ndarray(shape, dtype, buffer)` builds an array over any bytes, object pointers too)."""

    def __call__(self, *args, **kwargs):
        raise Refused("numpy.ndarray called directly (an array over arbitrary bytes)")


_NDARRAY = _Ndarray()


def _reconstruct_array(subtype, shape, dtype):
    """numpy's `_reconstruct(ndarray, shape, dtype)`, the empty array a BUILD then fills."""
    if subtype is not _NDARRAY:
        raise Refused("an array of another type than numpy.ndarray")
    return _reconstruct(np.ndarray, shape, _dtype(dtype))


def _encode(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _frombuffer(buffer, dtype, shape, order):
    """numpy's reconstruction of an array pickled with protocol 5 (its bytes in band)."""
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise Refused("an array from something other than plain bytes")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class PlainDataUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED; any other is refused before it is imported."""

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise Refused("a persistent id")


def load_plain_pickle(path: str | os.PathLike):
    """The plain data pickled in `path` (latin1 for Python 2's str, as torchvision reads CIFAR)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: missing from the extracted archive") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    with f:
        try:
            return PlainDataUnpickler(f, encoding="latin1").load()
        except Refused as err:
            raise UserError(f"{path}: not a plain-data CIFAR batch: its pickle asks for {err}, which is "
                            "refused (only arrays, text and numbers are read)") from None
        except Exception as err:  # truncated, malformed or unreadable: EOFError, ValueError, OSError, ...
            name = err.__class__.__name__
            raise UserError(f"{path}: not a CIFAR batch: {name}: {str(err)[:200]}") from None
