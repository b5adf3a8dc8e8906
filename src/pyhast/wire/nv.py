"""The nv list: HAST's typed name/value record, byte-compatible with FreeBSD.

Every HAST message header (replication requests and replies, handshake,
control and parent/worker messages) and the 4 KiB on-disk metadata block are
nv lists (spec 6.2).  An nv list is a concatenation of elements::

    offset  size               field
    0       1                  type      low 7 bits = type id (1..17),
                                         high bit = byte-order flag
    1       1                  namesize  strlen(name) + 1  (1..255)
    2       4                  dsize     value length in bytes, LE u32
    6       round8(namesize)   name      NUL-terminated, zero padded
    ...     round8(dsize)      value     dsize bytes, zero padded

The 6-byte element header itself is packed (not padded); only the name and
the value are padded to a multiple of 8.  All scalars and array elements are
little-endian.  Strings include their terminating NUL in ``dsize``.

Rules this module enforces
==========================

Encoding (``NV.add_*``):

* Integers are range-checked for their type (``ValueError``; ``TypeError``
  for a non-integer).  Names are 0..254 bytes of UTF-8 without NUL, strings
  have no embedded NUL, arrays are non-empty (FreeBSD's own validator rejects
  ``dsize == 0``, so an empty array could never be received).
* Padding is always written as zeros.
* An element is encoded as soon as it is added (as FreeBSD does into its
  ebuf), so :meth:`NV.encode` is a single copy.

Decoding (:meth:`NV.decode`), the checks of FreeBSD's ``nv_validate()`` plus
a few of our own:

* A zero byte where a type byte is expected ends the list; whatever follows
  is ignored, as in FreeBSD (the metadata block relies on trailing zeros).
* At least 8 bytes must remain for an element; header, padded name and padded
  value must all fit in the buffer.
* ``namesize`` > 0, the name is NUL-terminated exactly at ``namesize - 1``
  with no earlier NUL, and is valid UTF-8 (ours; FreeBSD does not check).
* The type id is in 1..17.  The byte-order flag 0x80 ("host order") is
  **rejected**: FreeBSD only sets it in memory and every sender converts the
  list with ``nv_hton()`` before it reaches a socket or the disk, so no
  conforming peer ever emits it.  (A FreeBSD receiver would read such an
  element in *its own* byte order, which is not a wire format.)
* ``dsize`` > 0; scalar sizes are exact; array sizes are a multiple of the
  element size; strings end with their only NUL and are valid UTF-8 (ours).
* Padding content is ignored (FreeBSD leaves garbage in name padding).
* Duplicate names are rejected unless ``allow_duplicates=True`` (FreeBSD has
  a "TODO: Check that names are unique?"; a duplicate is either a bug or an
  attempt to make two readers disagree).  Lookup returns the first match, as
  in FreeBSD, for lists built locally with repeated names.

Any malformed input raises :class:`~pyhast.errors.NVError` and nothing else.

Names may be empty (FreeBSD accepts ``namesize`` 1 too); values are stored
decoded, so :meth:`NV.encode` after :meth:`NV.decode` writes clean padding.

Performance (this runs for every replication request): one precompiled
``struct.Struct`` per layout; the element header + padded name of scalar
fields is cached per (type, name) on encode; on decode, each validated
element prefix (header + padded name, as received) is cached, so a known
prefix costs one dict lookup and only the value is checked; getters use a
name -> index dict.  All caches are bounded.

Fixed layouts (:class:`NVLayout`): the replication requests and replies are
always the same few lists of scalars.  A registered layout
(:func:`register_layout`) is recognised by :meth:`NV.decode` with one
``unpack`` and one comparison of all the element headers and names, byte for
byte as our encoder writes them (zero name padding); any other bytes, valid
or not, take the element-by-element path above, so results and errors do not
depend on the layouts.  Such a list (and one built by :meth:`NVLayout.build`)
keeps just its layout and values (:attr:`NV.shape`); getters read them
directly, and the element list is built only if something iterates,
compares, or adds a field that leads out of the layouts.
"""

from __future__ import annotations

import enum
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, TypeVar, cast, overload

from pyhast.errors import NVError, NVMissingError, NVTypeError

from .ebuf import Ebuf

__all__ = ["NV", "NVLayout", "NVType", "NVValue", "decode_fixed", "nv_dump", "register_layout"]


class NVType(enum.IntEnum):
    """Element type ids (NV_TYPE_* in FreeBSD's nv.c)."""

    INT8 = 1
    UINT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    INT8_ARRAY = 9
    UINT8_ARRAY = 10
    INT16_ARRAY = 11
    UINT16_ARRAY = 12
    INT32_ARRAY = 13
    UINT32_ARRAY = 14
    INT64_ARRAY = 15
    UINT64_ARRAY = 16
    #: NUL-terminated string; the NUL is part of ``dsize``.
    STRING = 17

    @property
    def label(self) -> str:
        """The name FreeBSD's ``nv_dump()`` prints ("uint8", "int16 array", "string")."""
        return _LABELS[self]

    @property
    def is_array(self) -> bool:
        """True for the eight array types."""
        return NVType.INT8_ARRAY <= self <= NVType.UINT64_ARRAY

    @property
    def is_scalar(self) -> bool:
        """True for the eight integer scalar types."""
        return self <= NVType.UINT64


#: A decoded value: int for scalars, bytes for uint8 arrays, a tuple of ints
#: for the other arrays, str for strings.
NVValue = int | str | bytes | tuple[int, ...]

_T = TypeVar("_T")


class _Missing(enum.Enum):
    MISSING = 0


_MISSING: Final = _Missing.MISSING

# --- tables indexed by the type id -------------------------------------------

_TYPES: Final[tuple[NVType, ...]] = (NVType.INT8, *NVType)  # index 0 unused
# Aliases for the getters: on Python 3.11 reading an enum member through its
# class costs ~70 ns, a global ~10 ns.
_INT8_T: Final = NVType.INT8
_UINT8_T: Final = NVType.UINT8
_INT16_T: Final = NVType.INT16
_UINT16_T: Final = NVType.UINT16
_INT32_T: Final = NVType.INT32
_UINT32_T: Final = NVType.UINT32
_INT64_T: Final = NVType.INT64
_UINT64_T: Final = NVType.UINT64
_STRING_T: Final = NVType.STRING
_UINT8_ARRAY_T: Final = NVType.UINT8_ARRAY
_CODES: Final = "?bBhHiIqQbBhHiIqQ?"  # struct code of a scalar / array element
_LABELS: Final[dict[int, str]] = {t: (t.name.lower().replace("_array", " array")) for t in NVType}
#: Size of a scalar, or of one array element; 1 for strings.
_ELEM_SIZE: Final[tuple[int, ...]] = (0, 1, 1, 2, 2, 4, 4, 8, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1)
_SCALAR_PADDED: Final[tuple[struct.Struct, ...]] = tuple(
    struct.Struct(f"<{c}{8 - _ELEM_SIZE[i]}x") if 1 <= i <= 8 else struct.Struct("")
    for i, c in enumerate(_CODES)
)
_SCALAR_UNPACK: Final = tuple(
    struct.Struct(f"<{c}" if 1 <= i <= 8 else "<B").unpack_from for i, c in enumerate(_CODES)
)

_HDR: Final = struct.Struct("<BBI")
_HDR_SIZE: Final = 6
_ORDER_HOST: Final = 0x80
_TYPE_FIRST: Final = 1
_TYPE_LAST: Final = 17
_STRING: Final = 17
_UINT8_ARRAY: Final = 10
_MAX_NAME_BYTES: Final = 254
#: ``_PAD[n & 7]`` is the padding that follows ``n`` bytes.
_PAD: Final[tuple[bytes, ...]] = tuple(bytes((8 - i) & 7) for i in range(8))

# --- name caches (bounded; names are a small fixed vocabulary in practice) ---

_CACHE_MAX: Final = 4096
#: name -> (namesize, padded NUL-terminated name)
_NAME_CACHE: dict[str, tuple[int, bytes]] = {}
#: per type id: name -> element header + padded name of a scalar element
_SCALAR_PREFIX: list[dict[str, bytes]] = [{} for _ in range(9)]


def _name_entry(name: str) -> tuple[int, bytes]:
    entry = _NAME_CACHE.get(name)
    if entry is not None:
        return entry
    if not isinstance(name, str):
        raise TypeError(f"nv name must be str, not {type(name).__name__}.")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"nv name {name!r} is not encodable as UTF-8.") from None
    if b"\0" in raw:
        raise ValueError(f"nv name {name!r} contains a NUL byte.")
    if len(raw) > _MAX_NAME_BYTES:
        raise ValueError(f"nv name is {len(raw)} bytes long, the limit is {_MAX_NAME_BYTES}.")
    namesize = len(raw) + 1
    entry = (namesize, raw + b"\0" + _PAD[namesize & 7])
    if len(_NAME_CACHE) >= _CACHE_MAX:
        _NAME_CACHE.clear()
    _NAME_CACHE[name] = entry
    return entry


def _scalar_prefix(name: str, t: int) -> bytes:
    cache = _SCALAR_PREFIX[t]
    prefix = cache.get(name)
    if prefix is None:
        namesize, padded = _name_entry(name)
        prefix = _HDR.pack(t, namesize, _ELEM_SIZE[t]) + padded
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[name] = prefix
    return prefix


def _int_error(t: int, value: object) -> Exception:
    if not hasattr(value, "__index__"):
        return TypeError(f"{_LABELS[t]} value must be an integer, not {type(value).__name__}.")
    return ValueError(f"Value {value!r} is out of range for {_LABELS[t]}.")


def _encode_element(name: str, t: int, value: NVValue) -> bytes:
    """Encode one element (used for arrays, strings and re-encoding)."""
    if t <= 8:
        return _scalar_prefix(name, t) + _SCALAR_PADDED[t].pack(value)
    namesize, padded = _name_entry(name)
    if t == _STRING:
        data = cast(str, value).encode("utf-8") + b"\0"
    elif t == _UINT8_ARRAY:
        data = cast(bytes, value)
    else:
        values = cast(tuple[int, ...], value)
        data = struct.pack(f"<{len(values)}{_CODES[t]}", *values)
    dsize = len(data)
    return _HDR.pack(t, namesize, dsize) + padded + data + _PAD[dsize & 7]


#: Validated element prefixes (6-byte header + padded name, exactly as
#: received) -> (type id, name, NVType, dsize, padded dsize).  Everything in
#: the prefix is checked once; the value is checked on every decode.
_Meta = tuple[int, str, NVType, int, int]
_PREFIX_CACHE: dict[bytes, _Meta] = {}
_PREFIX_CACHE_MAX: Final = 1024


def _check_prefix(prefix: bytes, pos: int) -> _Meta:
    """Validate an element header and name (not the value); cache the result."""
    t, namesize, dsize = _HDR.unpack_from(prefix)
    if t & _ORDER_HOST:
        raise NVError(f"nv element at offset {pos} has the host-order flag set.")
    if not _TYPE_FIRST <= t <= _TYPE_LAST:
        raise NVError(f"Invalid nv element type {t} at offset {pos}.")
    if namesize == 0:
        raise NVError(f"nv element at offset {pos} has a zero name size.")
    nend = _HDR_SIZE + namesize - 1
    if prefix.find(0, _HDR_SIZE, nend) != -1 or prefix[nend] != 0:
        raise NVError(f"nv element name at offset {pos} is not properly terminated.")
    try:
        name = prefix[_HDR_SIZE:nend].decode("utf-8")
    except UnicodeDecodeError:
        raise NVError(f"nv element name at offset {pos} is not valid UTF-8.") from None
    if dsize == 0:
        raise NVError(f"nv element {name!r} has a zero data size.")
    esize = _ELEM_SIZE[t]
    if (dsize != esize) if t <= 8 else (dsize % esize != 0):
        raise NVError(f"nv element {name!r} has size {dsize}, invalid for {_LABELS[t]}.")
    meta = (t, name, _TYPES[t], dsize, (dsize + 7) & ~7)
    if len(_PREFIX_CACHE) >= _PREFIX_CACHE_MAX:
        _PREFIX_CACHE.clear()
    _PREFIX_CACHE[prefix] = meta
    return meta


def _check_array_type(t: NVType) -> int:
    if not isinstance(t, NVType) or not t.is_array:
        raise ValueError(f"{t!r} is not an nv array type.")
    return int(t)


class NV:
    """An ordered nv list.

    Build one with the ``add_*`` methods and :meth:`encode` it, or
    :meth:`decode` received bytes and read it with the ``get_*`` methods.
    Getters raise :class:`~pyhast.errors.NVMissingError` when the field is
    absent (unless ``default=`` is given) and
    :class:`~pyhast.errors.NVTypeError` when it has another type.  Lookup
    returns the first element with that name.
    """

    __slots__ = ("_buf", "_index", "_items", "_shape")

    #: The elements, or None while only ``_shape`` describes them (built on
    #: first use, see :meth:`_elements`).
    _items: list[tuple[str, NVType, NVValue]] | None
    #: name -> index of its first element.  While ``_items`` is None this is
    #: the layout's own dict, shared and never modified (copied by _elements).
    _index: dict[str, int]
    #: The encoded elements, or None after decode (re-encoded on demand so
    #: that padding garbage from the peer is never echoed).
    _buf: bytearray | None
    #: The fixed layout the list was decoded or built with and its values,
    #: until the list is modified (see :attr:`shape`).
    _shape: tuple[NVLayout, tuple[int, ...]] | None

    def __init__(self) -> None:
        self._items = []
        self._index = {}
        self._buf = bytearray()
        self._shape = None

    @property
    def shape(self) -> tuple[NVLayout, tuple[int, ...]] | None:
        """``(layout, values)`` if the list is exactly a fixed layout, else None.

        Set by :meth:`decode` when the received bytes are exactly one of the
        registered layouts (see :func:`register_layout`) and by
        :meth:`NVLayout.build`; None once a field is added.  Lets the
        replication messages be read without a lookup per field.
        """
        return self._shape

    def _elements(self) -> list[tuple[str, NVType, NVValue]]:
        """The element list, built from the shape the first time it is needed."""
        items = self._items
        if items is not None:
            return items
        shape = self._shape
        assert shape is not None
        layout, values = shape
        items = list(zip(layout.names, layout.types, values, strict=True))
        self._items = items
        self._index = dict(layout.index)
        return items

    # --- building -------------------------------------------------------------

    def _materialize(self) -> bytearray:
        buf = bytearray()
        for name, t, value in self._elements():
            buf += _encode_element(name, t, value)
        self._buf = buf
        return buf

    def _append(self, name: str, t: int, value: NVValue, element: bytes) -> None:
        buf = self._buf
        if buf is None:
            buf = self._materialize()
        buf += element
        items = self._elements()
        self._shape = None
        if name not in self._index:
            self._index[name] = len(items)
        items.append((name, _TYPES[t], value))

    def _add_scalar(self, name: str, t: int, value: int) -> None:
        prefix = _SCALAR_PREFIX[t].get(name)
        if prefix is None:
            prefix = _scalar_prefix(name, t)
        try:
            packed = _SCALAR_PADDED[t].pack(value)
        except struct.error:
            raise _int_error(t, value) from None
        if type(value) is not int:
            value = operator.index(value)
        buf = self._buf
        if buf is None:
            buf = self._materialize()
        buf += prefix
        buf += packed
        shape = self._shape
        if shape is not None and self._items is None:
            grown = shape[0]._successors.get((name, t))
            if grown is not None:  # still exactly a fixed layout: stay lazy
                self._shape = (grown, (*shape[1], value))
                self._index = grown.index
                return
        items = self._elements()
        self._shape = None
        if name not in self._index:
            self._index[name] = len(items)
        items.append((name, _TYPES[t], value))

    def add_int8(self, name: str, value: int) -> None:
        """Append an int8 element."""
        self._add_scalar(name, 1, value)

    def add_uint8(self, name: str, value: int) -> None:
        """Append a uint8 element."""
        self._add_scalar(name, 2, value)

    def add_int16(self, name: str, value: int) -> None:
        """Append an int16 element."""
        self._add_scalar(name, 3, value)

    def add_uint16(self, name: str, value: int) -> None:
        """Append a uint16 element."""
        self._add_scalar(name, 4, value)

    def add_int32(self, name: str, value: int) -> None:
        """Append an int32 element."""
        self._add_scalar(name, 5, value)

    def add_uint32(self, name: str, value: int) -> None:
        """Append a uint32 element."""
        self._add_scalar(name, 6, value)

    def add_int64(self, name: str, value: int) -> None:
        """Append an int64 element."""
        self._add_scalar(name, 7, value)

    def add_uint64(self, name: str, value: int) -> None:
        """Append a uint64 element."""
        self._add_scalar(name, 8, value)

    def add_string(self, name: str, value: str) -> None:
        """Append a string element (ValueError if it contains a NUL)."""
        if not isinstance(value, str):
            raise TypeError(f"nv string value must be str, not {type(value).__name__}.")
        if "\0" in value:
            raise ValueError(f"nv string {name!r} contains a NUL character.")
        try:
            element = _encode_element(name, _STRING, value)
        except UnicodeEncodeError:
            raise ValueError(f"nv string {name!r} is not encodable as UTF-8.") from None
        self._append(name, _STRING, value, element)

    def add_uint8_array(self, name: str, value: bytes | bytearray | memoryview) -> None:
        """Append a uint8 array (raw bytes; must not be empty)."""
        data = bytes(value)
        if not data:
            raise ValueError(f"nv array {name!r} is empty (dsize 0 is invalid on the wire).")
        self._append(name, _UINT8_ARRAY, data, _encode_element(name, _UINT8_ARRAY, data))

    def add_array(self, name: str, type: NVType, values: Sequence[int]) -> None:
        """Append an array of ``type`` (one of the ``*_ARRAY`` types; non-empty)."""
        t = _check_array_type(type)
        if not values:
            raise ValueError(f"nv array {name!r} is empty (dsize 0 is invalid on the wire).")
        if t == _UINT8_ARRAY:
            self.add_uint8_array(name, bytes(values))  # bytes() range-checks
            return
        try:
            ints = tuple(operator.index(v) for v in values)
        except TypeError:
            raise TypeError(f"{_LABELS[t]} values must be integers.") from None
        try:
            element = _encode_element(name, t, ints)
        except struct.error:
            raise ValueError(f"A value is out of range for {_LABELS[t]}.") from None
        self._append(name, t, ints, element)

    # --- reading --------------------------------------------------------------

    def _get(self, name: str, t: NVType, default: object) -> object:
        i = self._index.get(name)
        if i is None:
            if default is _MISSING:
                raise NVMissingError(name)
            return default
        have: NVType
        value: NVValue
        items = self._items
        if items is None:  # shaped: read the values without building the list
            shape = self._shape
            assert shape is not None
            have, value = shape[0].types[i], shape[1][i]
        else:
            _, have, value = items[i]
        if have is not t:
            raise NVTypeError(f"Field {name!r} is {have.label}, expected {t.label}.")
        return value

    @overload
    def get_int8(self, name: str) -> int: ...
    @overload
    def get_int8(self, name: str, *, default: _T) -> int | _T: ...
    def get_int8(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the int8 field ``name``."""
        return self._get(name, _INT8_T, default)

    @overload
    def get_uint8(self, name: str) -> int: ...
    @overload
    def get_uint8(self, name: str, *, default: _T) -> int | _T: ...
    def get_uint8(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the uint8 field ``name``."""
        return self._get(name, _UINT8_T, default)

    @overload
    def get_int16(self, name: str) -> int: ...
    @overload
    def get_int16(self, name: str, *, default: _T) -> int | _T: ...
    def get_int16(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the int16 field ``name``."""
        return self._get(name, _INT16_T, default)

    @overload
    def get_uint16(self, name: str) -> int: ...
    @overload
    def get_uint16(self, name: str, *, default: _T) -> int | _T: ...
    def get_uint16(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the uint16 field ``name``."""
        return self._get(name, _UINT16_T, default)

    @overload
    def get_int32(self, name: str) -> int: ...
    @overload
    def get_int32(self, name: str, *, default: _T) -> int | _T: ...
    def get_int32(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the int32 field ``name``."""
        return self._get(name, _INT32_T, default)

    @overload
    def get_uint32(self, name: str) -> int: ...
    @overload
    def get_uint32(self, name: str, *, default: _T) -> int | _T: ...
    def get_uint32(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the uint32 field ``name``."""
        return self._get(name, _UINT32_T, default)

    @overload
    def get_int64(self, name: str) -> int: ...
    @overload
    def get_int64(self, name: str, *, default: _T) -> int | _T: ...
    def get_int64(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the int64 field ``name``."""
        return self._get(name, _INT64_T, default)

    @overload
    def get_uint64(self, name: str) -> int: ...
    @overload
    def get_uint64(self, name: str, *, default: _T) -> int | _T: ...
    def get_uint64(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the uint64 field ``name``."""
        return self._get(name, _UINT64_T, default)

    @overload
    def get_string(self, name: str) -> str: ...
    @overload
    def get_string(self, name: str, *, default: _T) -> str | _T: ...
    def get_string(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the string field ``name`` (without its NUL)."""
        return self._get(name, _STRING_T, default)

    @overload
    def get_uint8_array(self, name: str) -> bytes: ...
    @overload
    def get_uint8_array(self, name: str, *, default: _T) -> bytes | _T: ...
    def get_uint8_array(self, name: str, *, default: object = _MISSING) -> object:
        """Value of the uint8 array field ``name`` as bytes."""
        return self._get(name, _UINT8_ARRAY_T, default)

    @overload
    def get_array(self, name: str, type: NVType) -> tuple[int, ...]: ...
    @overload
    def get_array(self, name: str, type: NVType, *, default: _T) -> tuple[int, ...] | _T: ...
    def get_array(self, name: str, type: NVType, *, default: object = _MISSING) -> object:
        """Value of the array field ``name`` of ``type`` as a tuple of ints."""
        _check_array_type(type)
        value = self._get(name, type, default)
        if isinstance(value, bytes) and type is NVType.UINT8_ARRAY:
            return tuple(value)
        return value

    def exists(self, name: str) -> bool:
        """True if a field called ``name`` exists (any type)."""
        return name in self._index

    def type_of(self, name: str) -> NVType | None:
        """Type of the (first) field called ``name``, or None."""
        i = self._index.get(name)
        if i is None:
            return None
        items = self._items
        if items is None:
            shape = self._shape
            assert shape is not None
            return shape[0].types[i]
        return items[i][1]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def has_any(self, names: Iterable[str]) -> bool:
        """True if a field has one of ``names`` (one call instead of one ``in`` per name)."""
        return not self._index.keys().isdisjoint(names)

    def __len__(self) -> int:
        return len(self._elements())

    def __iter__(self) -> Iterator[tuple[str, NVType, NVValue]]:
        return iter(self._elements())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NV):
            return NotImplemented
        return self._elements() == other._elements()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}: {t.label} = {_short(v)}" for n, t, v in self._elements())
        return f"NV({fields})"

    # --- encoding -------------------------------------------------------------

    def encode(self) -> bytes:
        """The nv list in wire format (without the frame header)."""
        buf = self._buf
        if buf is None:
            buf = self._materialize()
        return bytes(buf)

    def encode_into(self, buf: Ebuf) -> None:
        """Append the wire format to ``buf`` (see :func:`pyhast.wire.frame.encode_frame`)."""
        mine = self._buf
        if mine is None:
            mine = self._materialize()
        buf.add_tail(mine)

    def encoded_size(self) -> int:
        """Length of :meth:`encode`'s result."""
        buf = self._buf
        if buf is None:
            buf = self._materialize()
        return len(buf)

    # --- decoding -------------------------------------------------------------

    @classmethod
    def decode(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        allow_duplicates: bool = False,
    ) -> NV:
        """Validate and decode an nv list (see the module docstring for the rules).

        Raises :class:`~pyhast.errors.NVError` on any malformed input.
        """
        if type(data) is not bytes:
            try:
                data = bytes(data)
            except (TypeError, ValueError, BufferError) as exc:
                raise NVError(f"Cannot read nv data: {exc}.") from None
        end = len(data)
        fixed = decode_fixed(data, 0, end)
        if fixed is not None:
            return fixed
        items: list[tuple[str, NVType, NVValue]] = []
        index: dict[str, int] = {}
        cache_get = _PREFIX_CACHE.get
        pos = 0
        while pos < end:
            if data[pos] == 0:
                break  # end of list; trailing bytes are ignored (FreeBSD)
            if end - pos < _HDR_SIZE + 2:
                raise NVError(f"Truncated nv element at offset {pos}.")
            vpos = pos + _HDR_SIZE + ((data[pos + 1] + 7) & ~7)
            if vpos > end:
                raise NVError(f"Truncated nv element name at offset {pos}.")
            prefix = data[pos:vpos]
            meta = cache_get(prefix)
            if meta is None:
                meta = _check_prefix(prefix, pos)
            t, name, nvt, dsize, pdsize = meta
            nxt = vpos + pdsize
            if nxt > end:
                raise NVError(f"Truncated nv element {name!r}.")
            value: NVValue
            if t <= 8:
                value = _SCALAR_UNPACK[t](data, vpos)[0]
            elif t == _UINT8_ARRAY:
                value = data[vpos : vpos + dsize]
            elif t == _STRING:
                vend = vpos + dsize - 1
                if data.find(0, vpos, vend) != -1 or data[vend] != 0:
                    raise NVError(f"nv string {name!r} is not properly terminated.")
                try:
                    value = data[vpos:vend].decode("utf-8")
                except UnicodeDecodeError:
                    raise NVError(f"nv string {name!r} is not valid UTF-8.") from None
            else:
                value = struct.unpack_from(f"<{dsize // _ELEM_SIZE[t]}{_CODES[t]}", data, vpos)
            if name in index:
                if not allow_duplicates:
                    raise NVError(f"Duplicate nv field {name!r}.")
            else:
                index[name] = len(items)
            items.append((name, nvt, value))
            pos = nxt
        nv = cls.__new__(cls)
        nv._items = items
        nv._index = index
        nv._buf = None
        nv._shape = None
        return nv


class NVLayout:
    """A fixed list of scalar fields, in the exact bytes that the ``add_*`` calls produce.

    The replication requests and replies (spec 6.4) always have one of a few
    such layouts, and they are most of the traffic: one ``struct`` call encodes
    a whole list (with the frame header in front, :meth:`frame`), and one
    unpack plus a comparison of the element headers and names recognises it
    on receipt (:meth:`match`), instead of a walk over the elements.

    A layout only describes bytes; it changes nothing about what is valid.
    Received bytes that differ in anything (field order, an extra field,
    padding garbage, another type) do not match and go through the generic
    :meth:`NV.decode`, which gives the same result for everything that does.
    """

    __slots__ = (
        "_frame",
        "_frame_args",
        "_list",
        "_list_args",
        "_prefixes",
        "_successors",
        "fields",
        "index",
        "names",
        "size",
        "types",
    )

    #: (name, type) of each field, in order.
    fields: tuple[tuple[str, NVType], ...]
    names: tuple[str, ...]
    types: tuple[NVType, ...]
    #: name -> position; shared by the lists of this layout, never modify it.
    index: dict[str, int]
    #: Length of the encoded list in bytes.
    size: int

    def __init__(self, *fields: tuple[str, NVType]) -> None:
        if not fields:
            raise ValueError("An nv layout needs at least one field.")
        names = tuple(name for name, _ in fields)
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate field in the nv layout {names}.")
        fmt = ""
        prefixes: list[bytes] = []
        for name, t in fields:
            if not isinstance(t, NVType) or not t.is_scalar:
                raise ValueError(f"nv layout field {name!r}: {t!r} is not a scalar type.")
            prefix = _scalar_prefix(name, t)
            prefixes.append(prefix)
            fmt += f"{len(prefix)}s{_CODES[t]}{8 - _ELEM_SIZE[t]}x"
        self.fields = tuple(fields)
        self.names = names
        self.types = tuple(t for _, t in fields)
        self.index = {name: i for i, name in enumerate(names)}
        self._prefixes = tuple(prefixes)
        #: the list alone: (prefix, value) * n
        self._list = struct.Struct("<" + fmt)
        #: frame header (version, nv size) + the list
        self._frame = struct.Struct("<BI" + fmt)
        self.size = self._list.size
        pairs: list[object] = []
        for prefix in prefixes:
            pairs += (prefix, 0)
        self._list_args = tuple(pairs)
        self._frame_args = (0, self.size, *pairs)
        #: (name, type id) -> the layout made by :meth:`plus`
        self._successors: dict[tuple[str, int], NVLayout] = {}

    def __repr__(self) -> str:
        return f"NVLayout({', '.join(f'{n}: {t.label}' for n, t in self.fields)})"

    def plus(self, name: str, t: NVType) -> NVLayout:
        """This layout followed by one more field.

        A list of this layout that gets that field added (``add_*``) keeps a
        :attr:`NV.shape`, of the new layout: ``pipeline_send`` adding
        ``size`` to a request stays cheap.
        """
        grown = self._successors.get((name, int(t)))
        if grown is None:
            grown = NVLayout(*self.fields, (name, t))
            self._successors[(name, int(t))] = grown
        return grown

    def frame(self, version: int, values: Sequence[int]) -> bytes | None:
        """Frame header + this list with ``values``, as ``encode_frame`` writes them.

        None if a value (or the version) does not fit its type or is not an
        integer: the caller then takes the generic path, which says what is
        wrong.  ``values`` must have one value per field.
        """
        args = list(self._frame_args)
        args[0] = version
        args[3::2] = values
        try:
            return self._frame.pack(*args)
        except struct.error:
            return None

    def build(self, values: tuple[int, ...]) -> NV:
        """The nv list of ``values``, exactly as adding the fields in order would build it.

        Raises what those ``add_*`` calls would raise.  The result has this
        :attr:`NV.shape`.
        """
        for value in values:
            if type(value) is not int:  # bool, IntEnum, ...: stored as plain int
                return self._build_by_fields(values)
        args = list(self._list_args)
        args[1::2] = values
        try:
            packed = self._list.pack(*args)
        except struct.error:
            return self._build_by_fields(values)
        return _shaped_nv(self, values, bytearray(packed))

    def _build_by_fields(self, values: tuple[int, ...]) -> NV:
        nv = NV()
        for (name, t), value in zip(self.fields, values, strict=True):
            nv._add_scalar(name, t, value)
        return nv

    def match(self, buf: bytes | bytearray, pos: int = 0) -> tuple[int, ...] | None:
        """The values if the :attr:`size` bytes at ``buf[pos:]`` are exactly this layout.

        Exactly: same element headers, names and zero name padding; the value
        padding is ignored, as :meth:`NV.decode` ignores it.  The caller
        checks that the list is :attr:`size` bytes long.
        """
        fields = self._list.unpack_from(buf, pos)
        if fields[0::2] != self._prefixes:
            return None
        return fields[1::2]


#: Layouts that decode tries before walking the elements, by encoded size.
_FIXED_LAYOUTS: dict[int, tuple[NVLayout, ...]] = {}


def register_layout(layout: NVLayout) -> None:
    """Let :meth:`NV.decode` (and :func:`decode_fixed`) recognise ``layout`` directly.

    Only an optimisation: a list that matches decodes to the same values as
    it would element by element.  Register the few layouts that carry the
    traffic; the layouts of one size are tried in registration order.
    """
    same_size = _FIXED_LAYOUTS.get(layout.size, ())
    if layout not in same_size:
        _FIXED_LAYOUTS[layout.size] = (*same_size, layout)


def decode_fixed(buf: bytes | bytearray, pos: int, size: int) -> NV | None:
    """The nv list of ``buf[pos:pos + size]`` if it is exactly a registered layout, else None.

    Reads ``buf`` in place (no copy of the list).  None means "decode it
    with :meth:`NV.decode`", never that the list is invalid.
    """
    for layout in _FIXED_LAYOUTS.get(size, ()):
        fields = layout._list.unpack_from(buf, pos)  # layout.match(), inlined
        if fields[0::2] == layout._prefixes:
            return _shaped_nv(layout, fields[1::2], None)
    return None


def _shaped_nv(layout: NVLayout, values: tuple[int, ...], buf: bytearray | None) -> NV:
    """An NV known by its layout and values; its element list is built when needed."""
    nv = NV.__new__(NV)
    nv._items = None
    nv._index = layout.index
    nv._buf = buf
    nv._shape = (layout, values)
    return nv


def _short(value: NVValue, limit: int = 32) -> str:
    if isinstance(value, bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} bytes)"
    if isinstance(value, tuple) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} items)"
    return repr(value)


def nv_dump(nv: NV) -> str:
    """Render ``nv`` like FreeBSD's ``nv_dump()``: one ``name (type): value`` per line.

    Arrays are printed as space-separated numbers, strings verbatim.
    """
    lines = []
    for name, t, value in nv:
        if isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            text = " ".join(str(v) for v in value)
        lines.append(f"{name} ({t.label}): {text}")
    return "\n".join(lines)
