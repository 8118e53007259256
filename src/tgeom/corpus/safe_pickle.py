"""A restricted unpickler for the 20 Newsgroups sample of the built-in corpus (SPEC section 2).

Plain ``pickle.load`` runs whatever callable a pickle names (``os.system`` included), so tgeom
never uses it. :func:`safe_loads` reads a pickle whose result is made only of plain values:
``dict``, ``list``, ``tuple``, ``set``, ``str``, ``bytes``, numbers, booleans and ``None``.

The gensim sample (``mini_newsgroup``, a zlib-compressed protocol-0 Python 2 pickle) is an
sklearn ``Bunch`` holding numpy arrays. Its few global names are therefore admitted, but never
resolved to the real objects: each maps to an inert local stand-in that builds plain values (a
``Bunch`` becomes a ``dict``, an array a nested ``list`` decoded from its raw bytes). No module
named in a pickle is ever imported, and any other global is refused with a :class:`TgeomError`.
"""

from __future__ import annotations

import io
import pickle
import re
import zlib
from typing import Any

import numpy as np

from tgeom.errors import TgeomError

_SIMPLE_DTYPE = re.compile(r"[biufcSUV?][0-9]{0,4}")  # no object, record or structured dtypes
_PLAIN_SCALARS = (str, bytes, int, float, complex, bool, type(None))


class _Marker:
    """An inert, immutable placeholder for a class a pickle names (only compared, never called)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise TgeomError("pickle tries to modify a class it names: not plain data.")


_RECORD = _Marker("record")  # sklearn Bunch: a dict with attribute access
_NDARRAY = _Marker("ndarray")


class _DtypeStub:
    """Stand-in for ``numpy.dtype(descr, align, copy)`` + its ``__setstate__``."""

    def __init__(self, descr: Any, align: Any = 0, copy: Any = 0) -> None:
        self.descr = _as_text(descr)
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise TgeomError("pickled array has a structured dtype: not plain data")
        self.byteorder = _as_text(state[1])

    def to_numpy(self) -> np.dtype:
        if not _SIMPLE_DTYPE.fullmatch(self.descr):
            raise TgeomError(f"pickled array of dtype {self.descr!r} is not plain data")
        order = self.byteorder if self.byteorder in "<>=" else "="
        return np.dtype(order + self.descr)


class _ArrayStub:
    """Stand-in for a pickled numpy array; ``__setstate__`` decodes it into nested lists."""

    values: Any = None

    def __setstate__(self, state: Any) -> None:
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub):
            raise TgeomError("pickled array has no plain dtype")
        shape = tuple(int(n) for n in shape)
        if isinstance(raw, list):  # object arrays pickle their items as a list
            self.values = np.array(raw, dtype=object).reshape(shape).tolist()
            return
        data = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
        array = np.frombuffer(data, dtype=dtype.to_numpy())
        self.values = array.reshape(shape, order="F" if fortran else "C").tolist()


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    raise TgeomError(f"pickled dtype descriptor {value!r} is not a string")


def _reconstruct_object(cls: Any, base: Any, state: Any) -> dict:
    """Stand-in for ``copyreg._reconstructor``: only a record over ``dict`` is accepted."""
    if cls is not _RECORD or base is not dict:
        raise TgeomError("pickle reconstructs an object that is not a plain record")
    return dict(state or {})


def _latin1_bytes(text: Any = "", encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as protocols 0-2 use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TgeomError("pickle calls a codec other than latin-1 for bytes")
    return text.encode("latin-1")


def _plain_bytes(value: Any = b"") -> bytes:
    """Stand-in for ``bytes(...)``: from bytes or a list of ints, never ``bytes(n)``."""
    if not isinstance(value, bytes | bytearray | list | tuple):
        raise TgeomError("pickle calls bytes() on something other than bytes or a list")
    return bytes(value)


def _new_array(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _ArrayStub:
    """Stand-in for ``numpy.core.multiarray._reconstruct``."""
    if cls is not _NDARRAY:
        raise TgeomError("pickle reconstructs an array of an unknown class")
    return _ArrayStub()


# (module, name) -> inert stand-in. Nothing else can be named by an admitted pickle.
_STAND_INS: dict[tuple[str, str], Any] = {
    ("copy_reg", "_reconstructor"): _reconstruct_object,
    ("copyreg", "_reconstructor"): _reconstruct_object,
    **{
        (module, kind.__name__): kind
        for module in ("__builtin__", "builtins")
        for kind in (dict, list, tuple, set, frozenset)
    },
    ("__builtin__", "bytes"): _plain_bytes,
    ("builtins", "bytes"): _plain_bytes,
    ("_codecs", "encode"): _latin1_bytes,
    ("sklearn.datasets.base", "Bunch"): _RECORD,
    ("sklearn.utils", "Bunch"): _RECORD,
    ("sklearn.utils._bunch", "Bunch"): _RECORD,
    ("numpy.core.multiarray", "_reconstruct"): _new_array,
    ("numpy._core.multiarray", "_reconstruct"): _new_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals only to the inert stand-ins above."""

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is None:
            raise TgeomError(
                f"refusing to unpickle {module}.{name}: the restricted unpickler admits only "
                "plain containers, strings, bytes and numbers."
            )
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise TgeomError("refusing to unpickle a persistent reference: not plain data.")


def safe_loads(data: bytes, *, name: str = "pickle") -> Any:
    """Unpickle ``data`` (zlib-compressed or not) into plain values only.

    Raises TgeomError naming ``name`` when the pickle refers to anything but plain data or
    cannot be read.
    """
    if data[:1] == b"x":  # zlib header (0x78); pickles start with an opcode, never b"x"
        try:
            data = zlib.decompress(data)
        except zlib.error as exc:
            raise TgeomError(f"{name}: cannot decompress ({exc}).") from None
    try:
        loaded = RestrictedUnpickler(io.BytesIO(data), encoding="latin-1").load()
        return _plain(loaded, set())
    except TgeomError as exc:
        raise TgeomError(f"{name}: {exc}") from None
    except Exception as exc:  # any malformed pickle is bad input, said in one line
        raise TgeomError(f"{name}: not a readable plain-data pickle ({exc}).") from None


def _plain(obj: Any, ancestors: set[int]) -> Any:
    """``obj`` with array stand-ins replaced by their lists; refuses anything not plain."""
    if isinstance(obj, _ArrayStub):
        return _plain(obj.values, ancestors)
    if type(obj) in _PLAIN_SCALARS:
        return obj
    if type(obj) not in (dict, list, tuple, set, frozenset):
        raise TgeomError(f"pickle holds a {type(obj).__name__}, which is not plain data.")
    if id(obj) in ancestors:
        raise TgeomError("pickle holds a container that contains itself.")
    ancestors.add(id(obj))
    if isinstance(obj, dict):
        result: Any = {_plain(k, ancestors): _plain(v, ancestors) for k, v in obj.items()}
    else:
        result = type(obj)(_plain(item, ancestors) for item in obj)
    ancestors.discard(id(obj))
    return result
