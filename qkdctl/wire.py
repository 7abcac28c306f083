"""Byte encoding of classical-channel messages.

Protocol messages are frozen dataclasses. A message class is made known to the
channel under a stable type name with :func:`message` (a class decorator) or
:func:`register`; :func:`encode` turns an instance into bytes and
:func:`decode` turns the bytes back into an equal instance.

The encoding is deterministic (one message has exactly one encoding, so equal
messages give equal bytes) and strict: :func:`decode` accepts only what
:func:`encode` can produce. Anything else -- truncated data, trailing bytes,
an unknown type name, a field set that differs from the class, a value of the
wrong kind for an annotated field, a non-minimal integer, a bool array byte
other than 0 or 1, invalid UTF-8, lengths larger than the data -- raises
:class:`WireError` and nothing else. Sizes read from the data are checked
against the bytes actually present before any memory is allocated, so a
forged length cannot make the decoder allocate more than the input's size.
No pickle is involved; decoding never executes code named by the data (only
registered classes are instantiated).

Field values may be ``None``, ``bool``, ``int`` (at most 255 bytes in two's
complement), ``float`` (IEEE 754 binary64), ``str``, ``bytes``, tuples of
these (nested at most :data:`MAX_DEPTH` deep) and numpy arrays of a bool,
integer, floating or complex dtype (dtype and shape are recorded; data is sent
little-endian in C order and decoded into a writable native-order array).
numpy scalars (``np.int64(3)``, ``np.bool_(True)``, ``np.float32(0.5)``) are
sent as the equivalent Python scalar.

Layout (all integers little-endian)::

    u8  format version (1)
    u16 length of the type name, then the type name in UTF-8
    u16 number of fields
    per field, in the class's declaration order:
        u16 length of the field name, then the name in UTF-8
        value

    value = u8 tag, then
        0x00 None        -
        0x01 False       -
        0x02 True        -
        0x03 int         u8 n (1..255), n bytes two's complement, minimal length
        0x04 float       8 bytes IEEE 754 binary64
        0x05 str         u32 n, n bytes UTF-8
        0x06 bytes       u32 n, n bytes
        0x07 tuple       u32 n, n values
        0x08 array       u8 dtype code, u8 ndim (0..32), ndim x u64 dims,
                         prod(dims) x itemsize bytes of data
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from typing import Any, TypeVar

import numpy as np

from .errors import QkdctlError

__all__ = [
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "REGISTRY",
    "Registry",
    "WireError",
    "decode",
    "encode",
    "message",
    "register",
]

FORMAT_VERSION = 1
MAX_DEPTH = 32          # nesting of tuples (and arrays inside tuples)
MAX_NDIM = 32
_MAX_INT_BYTES = 255
_MAX_ARRAY_BYTES = 1 << 62   # product of the non-zero dims x itemsize, even for empty arrays

T = TypeVar("T")


class WireError(QkdctlError):
    """A message cannot be encoded, or bytes are not a valid encoding of a known message."""


# ----------------------------------------------------------------------------------------
# value tags and dtypes

_NONE, _FALSE, _TRUE, _INT, _FLOAT, _STR, _BYTES, _TUPLE, _ARRAY = range(9)

_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(s) for s in (
    "|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8",
    "<f2", "<f4", "<f8", "<c8", "<c16"))
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


# ----------------------------------------------------------------------------------------
# registry

@dataclasses.dataclass(frozen=True)
class _Kind:
    """What an annotated field accepts; ``None`` members mean 'not checked'."""

    types: tuple[type, ...] | None          # accepted Python types (None: anything)
    items: tuple[_Kind, ...] | None = None  # tuple[X, Y]: one kind per position
    item: _Kind | None = None               # tuple[X, ...]: kind of every item


_ANY = _Kind(None)


class _Entry:
    def __init__(self, name: str, cls: type):
        self.name = name
        self.cls = cls
        self.fields = tuple(f.name for f in dataclasses.fields(cls))
        self._kinds: dict[str, _Kind] | None = None

    @property
    def kinds(self) -> dict[str, _Kind]:
        """Field kinds from the class annotations, resolved on first use."""
        if self._kinds is None:
            try:
                hints = typing.get_type_hints(self.cls)
            except Exception:  # unresolvable annotations: fields are not type-checked
                hints = {}
            self._kinds = {f: _kind_of(hints[f]) if f in hints else _ANY for f in self.fields}
        return self._kinds


def _kind_of(hint: Any) -> _Kind:
    """Translate a type annotation into a :class:`_Kind` (unknown forms are not checked)."""
    if hint is None or hint is type(None):
        return _Kind((type(None),))
    if hint in (bool, int, float, str, bytes):
        return _Kind((hint,))
    if hint is tuple:
        return _Kind((tuple,))
    if hint is np.ndarray:
        return _Kind((np.ndarray,))
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is np.ndarray:          # numpy.typing.NDArray[...]
        return _Kind((np.ndarray,))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _Kind((tuple,), item=_kind_of(args[0]))
        if args == ((),):             # tuple[()]
            return _Kind((tuple,), items=())
        return _Kind((tuple,), items=tuple(_kind_of(a) for a in args))
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind_of(a) for a in args]
        if any(k.types is None or k.items is not None or k.item is not None for k in kinds):
            return _ANY
        return _Kind(tuple(t for k in kinds for t in k.types))
    return _ANY


def _check_kind(kind: _Kind, value: Any, where: str) -> None:
    if kind.types is None:
        return
    value = _scalar(value)
    ok = False
    for t in kind.types:
        if t is int or t is float:
            # bool is not accepted for int/float fields; an int is fine for a float field
            accepted = (int,) if t is int else (int, float)
            if isinstance(value, accepted) and not isinstance(value, bool):
                ok = True
        elif isinstance(value, t):
            ok = True
    if not ok:
        want = " or ".join("None" if t is type(None) else t.__name__ for t in kind.types)
        raise WireError(f"{where}: expected {want}, got {type(value).__name__}")
    if isinstance(value, tuple):
        if kind.items is not None:
            if len(value) != len(kind.items):
                raise WireError(f"{where}: expected a tuple of {len(kind.items)} items, "
                                f"got {len(value)}")
            for i, (k, v) in enumerate(zip(kind.items, value, strict=True)):
                _check_kind(k, v, f"{where}[{i}]")
        elif kind.item is not None:
            for i, v in enumerate(value):
                _check_kind(kind.item, v, f"{where}[{i}]")


class Registry:
    """A mapping between stable type names and message classes."""

    def __init__(self) -> None:
        self._by_name: dict[str, _Entry] = {}
        self._by_cls: dict[type, _Entry] = {}

    def register(self, cls: type[T], name: str | None = None) -> type[T]:
        """Make ``cls`` (a frozen dataclass) known under ``name`` (default: its class name).

        Registering a class again without a name, or under the name it already
        has, does nothing. A name already used by another class, or a second
        name for the same class, is refused with ``ValueError``.
        """
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"{cls!r} is not a dataclass")
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        if any(not f.init for f in dataclasses.fields(cls)):
            raise TypeError(f"{cls.__name__}: every field must be an __init__ field")
        old = self._by_cls.get(cls)
        if old is not None:
            if name is None or name == old.name:
                return cls
            raise ValueError(f"{cls.__name__} is already registered as {old.name!r}")
        name = cls.__name__ if name is None else name
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > 0xFFFF:
            raise ValueError(f"bad message type name {name!r}")
        if name in self._by_name:
            raise ValueError(f"message type name {name!r} is already used by "
                             f"{self._by_name[name].cls.__qualname__}")
        entry = _Entry(name, cls)
        self._by_name[name] = entry
        self._by_cls[cls] = entry
        return cls

    def name_of(self, cls: type) -> str:
        """The registered type name of ``cls``."""
        entry = self._by_cls.get(cls)
        if entry is None:
            raise WireError(f"{cls.__qualname__} is not a registered message type")
        return entry.name

    def names(self) -> list[str]:
        """All registered type names."""
        return sorted(self._by_name)

    def encode(self, msg: Any) -> bytes:
        """The encoding of ``msg``, an instance of a registered class."""
        entry = self._by_cls.get(type(msg))
        if entry is None:
            raise WireError(f"{type(msg).__qualname__} is not a registered message type")
        out = bytearray()
        out += _U8.pack(FORMAT_VERSION)
        _put_name(out, entry.name)
        out += _U16.pack(len(entry.fields))
        kinds = entry.kinds
        for f in entry.fields:
            value = getattr(msg, f)
            where = f"{entry.name}.{f}"
            _check_kind(kinds[f], _scalar(value), where)
            _put_name(out, f)
            _put_value(out, value, where, 0)
        return bytes(out)

    def decode(self, data: bytes) -> Any:
        """The message encoded in ``data``; :class:`WireError` if it is not a valid encoding."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WireError(f"expected bytes, got {type(data).__name__}")
        r = _Reader(bytes(data))
        version = r.u8("format version")
        if version != FORMAT_VERSION:
            raise WireError(f"unsupported wire format version {version}")
        name = r.name("type name")
        entry = self._by_name.get(name)
        if entry is None:
            raise WireError(f"unknown message type {name!r}")
        n = r.u16("field count")
        if n != len(entry.fields):
            raise WireError(f"{name}: {n} fields, expected {len(entry.fields)} "
                            f"({', '.join(entry.fields)})")
        kinds = entry.kinds
        values = {}
        for f in entry.fields:
            got = r.name(f"{name}: field name")
            if got != f:
                raise WireError(f"{name}: field {got!r} where {f!r} was expected")
            where = f"{name}.{f}"
            value = r.value(where, 0)
            _check_kind(kinds[f], value, where)
            values[f] = value
        if r.pos != len(r.data):
            raise WireError(f"{name}: {len(r.data) - r.pos} bytes after the end of the message")
        try:
            return entry.cls(**values)
        except Exception as e:  # a class's own validation refused the values
            raise WireError(f"{name}: {e}") from e


REGISTRY = Registry()
"""The registry used by :func:`message`, :func:`register`, :func:`encode` and :func:`decode`."""


def register(cls: type[T], name: str | None = None, *,
             registry: Registry | None = None) -> type[T]:
    """Register a frozen dataclass as a message type (see :meth:`Registry.register`)."""
    return (REGISTRY if registry is None else registry).register(cls, name)


def message(cls: type[T] | str | None = None, *, name: str | None = None,
            registry: Registry | None = None) -> Any:
    """Class decorator registering a message type.

    Use as ``@message``, ``@message("TypeName")`` or ``@message(name="TypeName")``.
    """
    if isinstance(cls, str):
        name, cls = cls, None

    def deco(c: type[T]) -> type[T]:
        return register(c, name, registry=registry)

    return deco if cls is None else deco(cls)


def encode(msg: Any, registry: Registry | None = None) -> bytes:
    """Encode a registered message."""
    return (REGISTRY if registry is None else registry).encode(msg)


def decode(data: bytes, registry: Registry | None = None) -> Any:
    """Decode bytes produced by :func:`encode`; raises only :class:`WireError` on bad data."""
    return (REGISTRY if registry is None else registry).decode(data)


# ----------------------------------------------------------------------------------------
# encoder

def _scalar(value: Any) -> Any:
    """numpy scalars as the equivalent Python scalar; other values unchanged."""
    if isinstance(value, np.generic) and not isinstance(value, np.ndarray):
        if isinstance(value, (np.bool_, np.integer, np.floating)):
            return value.item()
    return value


def _put_name(out: bytearray, name: str) -> None:
    raw = name.encode("utf-8")
    out += _U16.pack(len(raw))
    out += raw


def _int_len(v: int) -> int:
    """Bytes of the minimal two's-complement representation of ``v``."""
    return ((v if v >= 0 else ~v).bit_length() + 8) // 8


def _put_value(out: bytearray, value: Any, where: str, depth: int) -> None:
    value = _scalar(value)
    if value is None:
        out.append(_NONE)
    elif value is True:
        out.append(_TRUE)
    elif value is False:
        out.append(_FALSE)
    elif isinstance(value, int):
        n = _int_len(value)
        if n > _MAX_INT_BYTES:
            raise WireError(f"{where}: integer too large ({n} bytes; at most {_MAX_INT_BYTES})")
        out.append(_INT)
        out += _U8.pack(n)
        out += value.to_bytes(n, "little", signed=True)
    elif isinstance(value, float):
        out.append(_FLOAT)
        out += _F64.pack(value)
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WireError(f"{where}: string is not encodable as UTF-8: {e.reason}") from None
        _put_sized(out, _STR, raw, where)
    elif isinstance(value, (bytes, bytearray, memoryview)) and not isinstance(value, np.ndarray):
        _put_sized(out, _BYTES, bytes(value), where)
    elif isinstance(value, tuple):
        if depth >= MAX_DEPTH:
            raise WireError(f"{where}: tuples nested more than {MAX_DEPTH} deep")
        if len(value) > 0xFFFFFFFF:
            raise WireError(f"{where}: tuple too long")
        out.append(_TUPLE)
        out += _U32.pack(len(value))
        for i, v in enumerate(value):
            _put_value(out, v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, np.ndarray):
        _put_array(out, value, where)
    else:
        hint = "; use a tuple" if isinstance(value, list) else ""
        raise WireError(f"{where}: values of type {type(value).__name__} cannot be sent{hint}")


def _put_sized(out: bytearray, tag: int, raw: bytes, where: str) -> None:
    if len(raw) > 0xFFFFFFFF:
        raise WireError(f"{where}: value too long ({len(raw)} bytes)")
    out.append(tag)
    out += _U32.pack(len(raw))
    out += raw


def _put_array(out: bytearray, arr: np.ndarray, where: str) -> None:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biufc" or arr.dtype.fields is not None:
        raise WireError(f"{where}: arrays of dtype {arr.dtype} cannot be sent "
                        "(bool, integer, floating or complex only)")
    wire_dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    code = _DTYPE_CODE.get(np.dtype(wire_dt))
    if code is None:
        raise WireError(f"{where}: arrays of dtype {arr.dtype} cannot be sent")
    if arr.ndim > MAX_NDIM:
        raise WireError(f"{where}: array has {arr.ndim} dimensions (at most {MAX_NDIM})")
    out.append(_ARRAY)
    out += _U8.pack(code)
    out += _U8.pack(arr.ndim)
    for d in arr.shape:
        out += _U64.pack(d)
    out += np.ascontiguousarray(arr, dtype=wire_dt).tobytes()


# ----------------------------------------------------------------------------------------
# decoder

class _Reader:
    """Bounds-checked cursor over the bytes being decoded."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise WireError(f"truncated message: {what} needs {n} bytes at offset {self.pos}, "
                            f"{len(self.data) - self.pos} left")
        b = self.data[self.pos:end]
        self.pos = end
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return _U16.unpack(self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]

    def text(self, n: int, what: str) -> str:
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{what}: invalid UTF-8 at offset {self.pos - n}") from None

    def name(self, what: str) -> str:
        return self.text(self.u16(what), what)

    def value(self, where: str, depth: int) -> Any:
        tag = self.u8(f"{where}: value tag")
        if tag == _NONE:
            return None
        if tag == _FALSE:
            return False
        if tag == _TRUE:
            return True
        if tag == _INT:
            n = self.u8(f"{where}: integer length")
            if n == 0:
                raise WireError(f"{where}: integer of length 0")
            v = int.from_bytes(self.take(n, f"{where}: integer"), "little", signed=True)
            if _int_len(v) != n:
                raise WireError(f"{where}: integer not in its shortest form")
            return v
        if tag == _FLOAT:
            return _F64.unpack(self.take(8, f"{where}: float"))[0]
        if tag == _STR:
            return self.text(self.u32(f"{where}: string length"), f"{where}: string")
        if tag == _BYTES:
            return self.take(self.u32(f"{where}: bytes length"), f"{where}: bytes")
        if tag == _TUPLE:
            if depth >= MAX_DEPTH:
                raise WireError(f"{where}: tuples nested more than {MAX_DEPTH} deep")
            n = self.u32(f"{where}: tuple length")
            if n > len(self.data) - self.pos:   # every item takes at least one byte
                raise WireError(f"truncated message: {where}: tuple of {n} items in "
                                f"{len(self.data) - self.pos} bytes")
            return tuple(self.value(f"{where}[{i}]", depth + 1) for i in range(n))
        if tag == _ARRAY:
            return self.array(where)
        raise WireError(f"{where}: unknown value tag 0x{tag:02x} at offset {self.pos - 1}")

    def array(self, where: str) -> np.ndarray:
        code = self.u8(f"{where}: array dtype")
        if code >= len(_DTYPES):
            raise WireError(f"{where}: unknown array dtype code {code}")
        dt = _DTYPES[code]
        ndim = self.u8(f"{where}: array ndim")
        if ndim > MAX_NDIM:
            raise WireError(f"{where}: array has {ndim} dimensions (at most {MAX_NDIM})")
        shape = tuple(self.u64(f"{where}: array shape") for _ in range(ndim))
        nonzero = math.prod(d for d in shape if d) * dt.itemsize
        if nonzero > _MAX_ARRAY_BYTES:
            raise WireError(f"{where}: array shape {shape} is too large")
        nbytes = math.prod(shape) * dt.itemsize
        left = len(self.data) - self.pos
        if nbytes > left:
            raise WireError(f"truncated message: {where}: array of shape {shape} needs "
                            f"{nbytes} bytes, {left} left")
        raw = self.take(nbytes, f"{where}: array data")
        arr = np.frombuffer(raw, dtype=dt)
        if dt.kind == "b" and arr.size and np.frombuffer(raw, np.uint8).max() > 1:
            raise WireError(f"{where}: bool array with a byte other than 0 or 1")
        try:
            return arr.astype(dt.newbyteorder("="), copy=True).reshape(shape)
        except ValueError as e:
            raise WireError(f"{where}: array shape {shape}: {e}") from None

