"""nv codec: golden bytes written by hand from spec 6.2/6.4, validation, API.

Golden vectors are spelled out byte by byte (``H()`` only joins hex and
literal chunks); they are never produced by the code under test.
"""

from __future__ import annotations

import enum

import pytest

from pyhast.errors import NVError, NVMissingError, NVTypeError, ProtocolError
from pyhast.wire.ebuf import Ebuf
from pyhast.wire.nv import NV, NVType, nv_dump


def H(*parts: str | bytes) -> bytes:
    """Join hex strings (spaces allowed) and literal byte strings."""
    return b"".join(bytes.fromhex(p) if isinstance(p, str) else p for p in parts)


# Name "a": namesize 2, padded to 8 bytes.
NAME_A = b"a\0" + bytes(6)

# One element of each of the 17 types: (adder, value, golden element bytes).
GOLDEN_ELEMENTS: list[tuple[NVType, object, bytes]] = [
    (NVType.INT8, -1, H("01 02 01000000", NAME_A, "ff 00000000000000")),
    (NVType.UINT8, 255, H("02 02 01000000", NAME_A, "ff 00000000000000")),
    (NVType.INT16, -2, H("03 02 02000000", NAME_A, "feff 000000000000")),
    (NVType.UINT16, 0x1234, H("04 02 02000000", NAME_A, "3412 000000000000")),
    (NVType.INT32, -3, H("05 02 04000000", NAME_A, "fdffffff 00000000")),
    (NVType.UINT32, 0xDEADBEEF, H("06 02 04000000", NAME_A, "efbeadde 00000000")),
    (NVType.INT64, -4, H("07 02 08000000", NAME_A, "fcffffffffffffff")),
    (NVType.UINT64, 0x0102030405060708, H("08 02 08000000", NAME_A, "0807060504030201")),
    (NVType.INT8_ARRAY, (-1, 1, 2), H("09 02 03000000", NAME_A, "ff0102 0000000000")),
    (NVType.UINT8_ARRAY, b"\x01\x02", H("0a 02 02000000", NAME_A, "0102 000000000000")),
    (NVType.INT16_ARRAY, (-1, 256), H("0b 02 04000000", NAME_A, "ffff 0001 00000000")),
    (NVType.UINT16_ARRAY, (1, 2, 3), H("0c 02 06000000", NAME_A, "0100 0200 0300 0000")),
    (NVType.INT32_ARRAY, (-1,), H("0d 02 04000000", NAME_A, "ffffffff 00000000")),
    (NVType.UINT32_ARRAY, (1, 2), H("0e 02 08000000", NAME_A, "01000000 02000000")),
    (NVType.INT64_ARRAY, (-2,), H("0f 02 08000000", NAME_A, "feffffffffffffff")),
    (
        NVType.UINT64_ARRAY,
        (1, 2**64 - 1),
        H("10 02 10000000", NAME_A, "0100000000000000 ffffffffffffffff"),
    ),
    (NVType.STRING, "hi", H("11 02 03000000", NAME_A, b"hi\0", "0000000000")),
]


def add_value(nv: NV, name: str, t: NVType, value: object) -> None:
    if t is NVType.STRING:
        assert isinstance(value, str)
        nv.add_string(name, value)
    elif t is NVType.UINT8_ARRAY:
        assert isinstance(value, bytes)
        nv.add_uint8_array(name, value)
    elif t.is_array:
        assert isinstance(value, tuple)
        nv.add_array(name, t, value)
    else:
        assert isinstance(value, int)
        getattr(nv, f"add_{t.name.lower()}")(name, value)


def get_value(nv: NV, name: str, t: NVType) -> object:
    if t is NVType.STRING:
        return nv.get_string(name)
    if t is NVType.UINT8_ARRAY:
        return nv.get_uint8_array(name)
    if t.is_array:
        return nv.get_array(name, t)
    return getattr(nv, f"get_{t.name.lower()}")(name)


# --- golden bytes --------------------------------------------------------------


@pytest.mark.parametrize(("t", "value", "golden"), GOLDEN_ELEMENTS, ids=lambda x: str(x))
def test_each_type_encodes_to_golden_bytes(t: NVType, value: object, golden: bytes) -> None:
    nv = NV()
    add_value(nv, "a", t, value)
    assert nv.encode() == golden
    assert nv.encoded_size() == len(golden)


@pytest.mark.parametrize(("t", "value", "golden"), GOLDEN_ELEMENTS, ids=lambda x: str(x))
def test_each_type_decodes_from_golden_bytes(t: NVType, value: object, golden: bytes) -> None:
    nv = NV.decode(golden)
    assert len(nv) == 1
    assert nv.type_of("a") is t
    assert get_value(nv, "a", t) == value
    assert list(nv) == [("a", t, value)]


def test_all_seventeen_types_in_one_list() -> None:
    nv = NV()
    for i, (t, value, _) in enumerate(GOLDEN_ELEMENTS):
        add_value(nv, f"f{i}", t, value)
    back = NV.decode(nv.encode())
    assert back == nv
    assert [t for _, t, _ in back] == list(NVType)
    assert len(GOLDEN_ELEMENTS) == len(NVType) == 17


REQUEST_WRITE = H(
    "02 04 01000000", b"cmd\0", "00000000", "02 00000000000000",  # cmd: uint8 2 (WRITE)
    "08 04 08000000", b"seq\0", "00000000", "0700000000000000",  # seq: uint64 7
    "08 07 08000000", b"offset\0", "00", "0010000000000000",  # offset: uint64 4096
    "08 07 08000000", b"length\0", "00", "0002000000000000",  # length: uint64 512
)  # fmt: skip


def test_request_header_golden() -> None:
    nv = NV()
    nv.add_uint8("cmd", 2)
    nv.add_uint64("seq", 7)
    nv.add_uint64("offset", 4096)
    nv.add_uint64("length", 512)
    assert nv.encode() == REQUEST_WRITE
    assert len(REQUEST_WRITE) == 88
    back = NV.decode(REQUEST_WRITE)
    assert back.get_uint8("cmd") == 2
    assert back.get_uint64("seq") == 7
    assert back.get_uint64("offset") == 4096
    assert back.get_uint64("length") == 512
    assert "memsync" not in back


def test_memsync_write_request_golden() -> None:
    golden = REQUEST_WRITE + H("02 08 01000000", b"memsync\0", "01 00000000000000")
    nv = NV.decode(REQUEST_WRITE)
    nv.add_uint8("memsync", 1)
    assert nv.encode() == golden
    assert NV.decode(golden).get_uint8("memsync") == 1


def test_handshake_message_golden() -> None:
    # 6.1 step 1: {resource: string, version: uint8 = 2}
    golden = H(
        "11 09 07000000", b"resource\0", "00000000000000", b"shared\0", "00",
        "02 08 01000000", b"version\0", "02 00000000000000",
    )  # fmt: skip
    nv = NV()
    nv.add_string("resource", "shared")
    nv.add_uint8("version", 2)
    assert nv.encode() == golden
    back = NV.decode(golden)
    assert back.get_string("resource") == "shared"
    assert back.get_uint8("version") == 2


def test_keepalive_golden() -> None:
    golden = H("02 04 01000000", b"cmd\0", "00000000", "05 00000000000000")
    nv = NV()
    nv.add_uint8("cmd", 5)
    assert nv.encode() == golden
    assert NV.decode(golden).get_uint8("cmd") == 5
    assert "seq" not in NV.decode(golden)


def test_appendix_first_handshake_reply_nv() -> None:
    token = bytes(range(0xA0, 0xB0))
    golden = H(
        "02 08 01000000", b"version\0", "02 00000000000000",
        "0a 06 10000000", b"token\0", "0000", token,
    )  # fmt: skip
    assert len(golden) == 0x34
    nv = NV.decode(golden)
    assert nv.get_uint8("version") == 2
    assert nv.get_uint8_array("token") == token


# --- decoding rules -------------------------------------------------------------


def test_trailing_zeros_are_legal_like_the_metadata_block() -> None:
    block = REQUEST_WRITE + bytes(4096 - len(REQUEST_WRITE))
    nv = NV.decode(block)
    assert nv.get_uint64("length") == 512
    assert nv.encode() == REQUEST_WRITE


def test_zero_type_byte_ends_the_list_and_rest_is_ignored() -> None:
    data = REQUEST_WRITE + b"\0" + b"garbage that is never parsed"
    assert len(NV.decode(data)) == 4


def test_empty_and_all_zero_input_is_an_empty_list() -> None:
    assert len(NV.decode(b"")) == 0
    assert len(NV.decode(bytes(64))) == 0


def test_padding_garbage_is_ignored_and_never_echoed() -> None:
    dirty = H("08 04 08000000", b"seq\0", "deadbeef", "0700000000000000") + H(
        "02 02 01000000", b"x\0", "aabbccddeeff", "05 11223344556677"
    )
    clean = H("08 04 08000000", b"seq\0", "00000000", "0700000000000000") + H(
        "02 02 01000000", b"x\0", "000000000000", "05 00000000000000"
    )
    nv = NV.decode(dirty)
    assert nv.get_uint64("seq") == 7
    assert nv.get_uint8("x") == 5
    assert nv.encode() == clean
    assert nv.encoded_size() == len(clean)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like(kind: type) -> None:
    assert NV.decode(kind(REQUEST_WRITE)).get_uint64("seq") == 7


def test_decode_from_a_memoryview_slice() -> None:
    framed = b"\x02\x58\x00\x00\x00" + REQUEST_WRITE + b"payload"
    nv = NV.decode(memoryview(framed)[5 : 5 + 88])
    assert nv.get_uint64("offset") == 4096


SEQ_OK = H("08 04 08000000", b"seq\0", "00000000", "0700000000000000")

REJECTED: dict[str, bytes] = {
    # Fewer than 8 bytes left for an element.
    "truncated_header": H("02 04 01000000 63"),
    # High bit 0x80 = host order: never on the wire (see module doc).
    "host_order_flag": H("88 04 08000000", b"seq\0", "00000000", "0700000000000000"),
    "type_18": H("12 04 08000000", b"seq\0", "00000000", "0700000000000000"),
    "type_127": H("7f 04 08000000", b"seq\0", "00000000", "0700000000000000"),
    "namesize_0": H("02 00 01000000", "00000000000000000000"),
    # namesize says 4 but byte 3 of the name is not NUL.
    "name_not_terminated": H("02 04 01000000", b"cmdX", "00000000", "02 00000000000000"),
    # NUL before namesize - 1 (strlen != namesize - 1).
    "name_embedded_nul": H("02 04 01000000", b"c\0d\0", "00000000", "02 00000000000000"),
    "name_not_utf8": H("02 04 01000000", b"\xff\xfe\xfd\0", "00000000", "02 00000000000000"),
    # Name padding runs past the end of the buffer.
    "name_truncated": H("02 0c 01000000", b"compression\0"),
    "dsize_0": H("02 04 00000000", b"cmd\0", "00000000"),
    "uint8_size_2": H("02 04 02000000", b"cmd\0", "00000000", "0200 000000000000"),
    "uint64_size_4": H("08 04 04000000", b"seq\0", "00000000", "07000000 00000000"),
    "int16_size_1": H("03 04 01000000", b"err\0", "00000000", "16 00000000000000"),
    "uint16_array_size_3": H("0c 02 03000000", NAME_A, "010002 0000000000"),
    "uint64_array_size_12": H("10 02 0c000000", NAME_A, "01" + "00" * 11, "00000000"),
    "string_not_terminated": H("11 02 03000000", NAME_A, b"hiX", "0000000000"),
    "string_embedded_nul": H("11 02 03000000", NAME_A, b"h\0\0", "0000000000"),
    "string_not_utf8": H("11 02 03000000", NAME_A, b"\xc3\x28\0", "0000000000"),
    # Value runs past the end of the buffer.
    "value_truncated": H("08 04 08000000", b"seq\0", "00000000", "07000000"),
    # Value fits but its padding does not (FreeBSD requires the padded size).
    "value_padding_truncated": H("02 04 01000000", b"cmd\0", "00000000", "02"),
    # A good element followed by a truncated one.
    "second_element_truncated": SEQ_OK + H("02 04 01000000", b"cmd\0"),
    "duplicate_name": SEQ_OK + SEQ_OK,
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_malformed_input_raises_nverror(name: str) -> None:
    with pytest.raises(NVError) as info:
        NV.decode(REJECTED[name])
    assert isinstance(info.value, ProtocolError)
    assert info.value.errno == 22  # EINVAL


def test_rejections_are_not_cached_as_valid() -> None:
    for _ in range(2):  # the second round would hit a wrongly filled cache
        for data in REJECTED.values():
            with pytest.raises(NVError):
                NV.decode(data)


def test_duplicates_can_be_allowed_and_first_match_wins() -> None:
    second = H("08 04 08000000", b"seq\0", "00000000", "0800000000000000")
    nv = NV.decode(SEQ_OK + second, allow_duplicates=True)
    assert len(nv) == 2
    assert nv.get_uint64("seq") == 7


def test_wrong_type_for_first_match_is_a_type_error_even_if_a_later_one_fits() -> None:
    nv = NV()
    nv.add_uint32("size", 1)
    nv.add_uint64("size", 2)
    with pytest.raises(NVTypeError):
        nv.get_uint64("size")
    assert nv.get_uint32("size") == 1


def test_empty_name_is_legal_as_in_freebsd() -> None:
    golden = H("02 01 01000000", "00 00000000000000", "09 00000000000000")
    nv = NV()
    nv.add_uint8("", 9)
    assert nv.encode() == golden
    assert NV.decode(golden).get_uint8("") == 9


def test_longest_name() -> None:
    name = "n" * 254
    nv = NV()
    nv.add_uint8(name, 1)
    data = nv.encode()
    assert data[1] == 255  # namesize
    assert len(data) == 6 + 256 + 8
    assert NV.decode(data).get_uint8(name) == 1


def test_non_ascii_name_and_string() -> None:
    nv = NV()
    nv.add_string("nöm", "välue ✓")
    data = nv.encode()
    assert data[1] == len("nöm".encode()) + 1
    assert NV.decode(data).get_string("nöm") == "välue ✓"


def test_empty_string_value() -> None:
    golden = H("11 02 01000000", NAME_A, "00 00000000000000")
    nv = NV()
    nv.add_string("a", "")
    assert nv.encode() == golden
    assert NV.decode(golden).get_string("a") == ""


# --- building -------------------------------------------------------------------

RANGES = [
    ("int8", -(2**7), 2**7 - 1),
    ("uint8", 0, 2**8 - 1),
    ("int16", -(2**15), 2**15 - 1),
    ("uint16", 0, 2**16 - 1),
    ("int32", -(2**31), 2**31 - 1),
    ("uint32", 0, 2**32 - 1),
    ("int64", -(2**63), 2**63 - 1),
    ("uint64", 0, 2**64 - 1),
]


@pytest.mark.parametrize(("kind", "lo", "hi"), RANGES)
def test_scalar_range_checks(kind: str, lo: int, hi: int) -> None:
    nv = NV()
    add = getattr(nv, f"add_{kind}")
    add("lo", lo)
    add("hi", hi)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError):
            add("bad", bad)
    with pytest.raises(TypeError):
        add("bad", 1.5)
    assert len(nv) == 2  # failed adds leave no trace
    back = NV.decode(nv.encode())
    get = getattr(back, f"get_{kind}")
    assert (get("lo"), get("hi")) == (lo, hi)


def test_array_range_checks() -> None:
    nv = NV()
    with pytest.raises(ValueError):
        nv.add_array("a", NVType.UINT16_ARRAY, [1, 65536])
    with pytest.raises(ValueError):
        nv.add_array("a", NVType.INT8_ARRAY, [-129])
    with pytest.raises(ValueError):
        nv.add_array("a", NVType.UINT8_ARRAY, [256])
    with pytest.raises(TypeError):
        nv.add_array("a", NVType.UINT32_ARRAY, [1.0])  # type: ignore[list-item]
    assert len(nv) == 0
    assert nv.encode() == b""


def test_add_array_needs_an_array_type() -> None:
    with pytest.raises(ValueError):
        NV().add_array("a", NVType.UINT8, [1])
    with pytest.raises(ValueError):
        NV().add_array("a", NVType.STRING, [1])


def test_empty_arrays_are_refused() -> None:
    # dsize 0 is invalid on the wire; refuse to produce it.
    with pytest.raises(ValueError):
        NV().add_uint8_array("a", b"")
    with pytest.raises(ValueError):
        NV().add_array("a", NVType.INT64_ARRAY, [])


def test_uint8_array_via_add_array_and_get_array() -> None:
    nv = NV()
    nv.add_array("t", NVType.UINT8_ARRAY, [1, 2, 255])
    assert nv.get_uint8_array("t") == b"\x01\x02\xff"
    assert nv.get_array("t", NVType.UINT8_ARRAY) == (1, 2, 255)
    nv.add_uint8_array("m", memoryview(b"xyz"))
    assert nv.get_uint8_array("m") == b"xyz"


@pytest.mark.parametrize(
    "name",
    ["a\0b", "x" * 255, "é" * 128, "\udcff"],
    ids=["nul", "255_bytes", "256_utf8_bytes", "surrogate"],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        NV().add_uint8(name, 1)
    with pytest.raises(ValueError):
        NV().add_string(name, "v")


def test_name_must_be_str() -> None:
    with pytest.raises(TypeError):
        NV().add_uint8(b"cmd", 1)  # type: ignore[arg-type]


def test_bad_strings() -> None:
    with pytest.raises(ValueError):
        NV().add_string("s", "a\0b")
    with pytest.raises(ValueError):
        NV().add_string("s", "\udcff")
    with pytest.raises(TypeError):
        NV().add_string("s", b"bytes")  # type: ignore[arg-type]


class Cmd(enum.IntEnum):
    WRITE = 2


def test_int_subclasses_are_stored_as_plain_ints() -> None:
    nv = NV()
    nv.add_uint8("cmd", Cmd.WRITE)
    nv.add_int8("flag", True)
    assert [type(v) for _, _, v in nv] == [int, int]
    assert nv == NV.decode(nv.encode())


# --- reading --------------------------------------------------------------------


def test_getters_missing_default_and_wrong_type() -> None:
    nv = NV.decode(REQUEST_WRITE)
    with pytest.raises(NVMissingError) as info:
        nv.get_uint8("memsync")
    assert info.value.name == "memsync"
    assert info.value.errno == 2  # ENOENT
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, ProtocolError)
    assert nv.get_uint8("memsync", default=0) == 0
    assert nv.get_uint8("memsync", default=None) is None
    assert nv.get_string("nope", default="x") == "x"
    assert nv.get_uint8_array("nope", default=b"") == b""
    assert nv.get_array("nope", NVType.INT16_ARRAY, default=()) == ()
    with pytest.raises(NVTypeError):
        nv.get_uint32("seq")
    with pytest.raises(NVTypeError):
        nv.get_uint32("seq", default=0)  # the default does not hide a wrong type
    with pytest.raises(NVTypeError):
        nv.get_string("cmd")
    with pytest.raises(NVTypeError):
        nv.get_array("cmd", NVType.UINT8_ARRAY)
    with pytest.raises(ValueError):
        nv.get_array("cmd", NVType.UINT8)


def test_container_protocol() -> None:
    nv = NV.decode(REQUEST_WRITE)
    assert len(nv) == 4
    assert "seq" in nv
    assert "nope" not in nv
    assert nv.exists("offset")
    assert not nv.exists("nope")
    assert nv.type_of("cmd") is NVType.UINT8
    assert nv.type_of("nope") is None
    assert [(n, t) for n, t, _ in nv] == [
        ("cmd", NVType.UINT8),
        ("seq", NVType.UINT64),
        ("offset", NVType.UINT64),
        ("length", NVType.UINT64),
    ]


def test_equality_and_order() -> None:
    a = NV()
    a.add_uint8("x", 1)
    a.add_uint8("y", 2)
    b = NV()
    b.add_uint8("y", 2)
    b.add_uint8("x", 1)
    assert a != b  # order matters
    c = NV.decode(a.encode())
    assert a == c
    assert a != "x"
    assert NV() == NV()


def test_repr_and_dump() -> None:
    nv = NV()
    nv.add_uint8("cmd", 2)
    nv.add_string("checksum", "crc32")
    nv.add_uint8_array("hash", b"\x26\x39\xf4\xcb")
    nv.add_array("list", NVType.INT16_ARRAY, [-1, 2])
    nv.add_uint8_array("big", bytes(100))
    text = repr(nv)
    assert text.startswith("NV(")
    assert "cmd: uint8 = 2" in text
    assert "checksum: string = 'crc32'" in text
    assert "(100 bytes)" in text
    assert nv_dump(nv).splitlines()[:4] == [
        "cmd (uint8): 2",
        "checksum (string): crc32",
        "hash (uint8 array): 38 57 244 203",
        "list (int16 array): -1 2",
    ]


def test_encode_into_ebuf_and_add_after_decode() -> None:
    eb = Ebuf()
    nv = NV.decode(REQUEST_WRITE)
    nv.encode_into(eb)
    assert bytes(eb.data()) == REQUEST_WRITE
    nv.add_uint8("memsync", 1)  # adding to a decoded list re-encodes it first
    assert nv.encode() == REQUEST_WRITE + H("02 08 01000000", b"memsync\0", "01 00000000000000")


def test_nvtype_helpers() -> None:
    assert NVType.UINT8_ARRAY.label == "uint8 array"
    assert NVType.STRING.label == "string"
    assert NVType.INT64.is_scalar and not NVType.INT64.is_array
    assert NVType.INT8_ARRAY.is_array and not NVType.STRING.is_array
    assert [int(t) for t in NVType] == list(range(1, 18))
