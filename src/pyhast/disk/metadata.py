"""The 4 KiB metadata block at offset 0 of every provider (spec section 4).

Layout of a provider::

    offset 0            4096                 localoff                 mediasize
    | metadata (4 KiB) | activemap bitmap   | user data (datasize bytes) ... |

``hastctl create`` puts localoff at the next multiple of 4 KiB after the
bitmap (FreeBSD: right after it, at a multiple of the sector size only, which
misaligns the whole data area on 512-byte-sector providers and regular
files: every 4 KiB write then touches two pages, and once they left the page
cache it reads both first -- 47 us of CPU and 94 us of wall time per write
instead of 5, measured on ext4).  ``-a 512`` gives FreeBSD's layout.  Readers
take localoff from the block, FreeBSD's too, so either layout works with
either implementation.

The block holds an nv list (no frame header) followed by zero padding, with
FreeBSD's field names and types: ``resource`` string, ``datasize`` uint64,
``extentsize`` uint32, ``keepdirty`` uint32, ``offset`` uint64 (localoff),
``resuid`` uint64, ``localcnt`` uint64, ``remotecnt`` uint64, ``prevrole``
string.  The counters are the writer's own: a secondary stores its pair, a
primary (or init) its pair.

FreeBSD trusts what it reads; we also check that the geometry is sane (extent
size a power of two, the data area inside the provider) so that a damaged or
foreign block is refused with a sentence rather than used.
"""

from __future__ import annotations

import dataclasses
import os

from pyhast.defaults import HAST_DATA_ALIGN, HAST_EXTENTSIZE, HAST_KEEPDIRTY, METADATA_SIZE
from pyhast.disk.activemap import Activemap
from pyhast.disk.provider import Provider
from pyhast.enums import Role
from pyhast.errors import ExitCode, HastError, MetadataError, NVError
from pyhast.wire.nv import NV, NVType


@dataclasses.dataclass
class Metadata:
    """The decoded metadata block of one provider."""

    resource: str | None
    datasize: int
    extentsize: int
    keepdirty: int
    localoff: int
    resuid: int = 0
    localcnt: int = 0
    remotecnt: int = 0
    prevrole: Role = Role.INIT
    #: pyhast: byte ranges of the data area whose local copy is stale (a local
    #: write failed while the peer's succeeded), as flattened ``offset,
    #: length`` pairs; they are synchronised from the peer.  Stored as the
    #: uint64 array ``localstale``, which FreeBSD's reader ignores.
    localstale: tuple[int, ...] = ()

    @property
    def mapsize(self) -> int:
        """Bytes between the metadata block and the data area: the bitmap, and
        the alignment padding after it (see the module docstring)."""
        return self.localoff - METADATA_SIZE

    def encode(self) -> bytes:
        """The whole 4096-byte block, zero padded."""
        nv = NV()
        if self.resource is not None:
            nv.add_string("resource", self.resource)
        nv.add_uint64("datasize", self.datasize)
        nv.add_uint32("extentsize", self.extentsize)
        nv.add_uint32("keepdirty", self.keepdirty)
        nv.add_uint64("offset", self.localoff)
        nv.add_uint64("resuid", self.resuid)
        nv.add_uint64("localcnt", self.localcnt)
        nv.add_uint64("remotecnt", self.remotecnt)
        nv.add_string("prevrole", self.prevrole.label)
        if self.localstale:
            nv.add_array("localstale", NVType.UINT64_ARRAY, self.localstale)
        data = nv.encode()
        if len(data) >= METADATA_SIZE:
            raise MetadataError("Metadata does not fit in its 4096-byte block.")
        return data + bytes(METADATA_SIZE - len(data))

    @classmethod
    def decode(cls, block: bytes | bytearray | memoryview, where: str = "provider") -> Metadata:
        """Decode a metadata block; MetadataError names ``where`` on failure."""
        if not any(block):
            raise MetadataError(
                f"{where} holds no HAST metadata (the block at offset 0 is all zeros); "
                "run 'hastctl create' first."
            )
        try:
            nv = NV.decode(block)
            prevrole_text = nv.get_string("prevrole", default="init")
            md = cls(
                resource=nv.get_string("resource", default=None),
                datasize=nv.get_uint64("datasize"),
                extentsize=nv.get_uint32("extentsize"),
                keepdirty=nv.get_uint32("keepdirty"),
                localoff=nv.get_uint64("offset"),
                resuid=nv.get_uint64("resuid"),
                localcnt=nv.get_uint64("localcnt"),
                remotecnt=nv.get_uint64("remotecnt"),
                localstale=nv.get_array("localstale", NVType.UINT64_ARRAY, default=()),
            )
        except NVError as exc:
            raise MetadataError(f"Metadata read from {where} is invalid: {exc}") from exc
        try:
            md.prevrole = Role.from_label(prevrole_text)
        except ValueError:
            md.prevrole = Role.INIT
        return md

    def check_geometry(self, mediasize: int, sectorsize: int, where: str = "provider") -> None:
        """Refuse metadata whose geometry cannot describe this provider."""
        es = self.extentsize
        if es <= 0 or es & (es - 1) or es < sectorsize or es % sectorsize:
            raise MetadataError(
                f"Metadata of {where} has an invalid extent size ({es}); "
                f"it must be a power of two and a multiple of the sector size ({sectorsize})."
            )
        need = Activemap.ondisk_size(self.datasize, es, sectorsize)
        if self.localoff < METADATA_SIZE + need or self.localoff % sectorsize:
            raise MetadataError(
                f"Metadata of {where} has an invalid data offset ({self.localoff})."
            )
        if self.datasize <= 0 or self.localoff + self.datasize > mediasize:
            raise MetadataError(
                f"Metadata of {where} describes {self.datasize} bytes of data at offset "
                f"{self.localoff}, more than the provider's {mediasize} bytes."
            )


def metadata_read(provider: Provider, resource: str | None = None) -> Metadata:
    """Read and check the metadata of an open provider.

    ``resource`` is the configured resource name: a block written for another
    resource is refused ("Provider X is not part of resource Y."), a block
    without a name is accepted, as FreeBSD does.
    """
    try:
        block = os.pread(provider.fd, METADATA_SIZE, 0)
    except OSError as exc:
        raise MetadataError(
            f"Unable to read metadata from {provider.path}: {exc.strerror}."
        ) from exc
    if len(block) != METADATA_SIZE:
        raise MetadataError(
            f"Unable to read metadata from {provider.path}: the provider is too small."
        )
    md = Metadata.decode(block, provider.path)
    if resource is not None and md.resource is not None and md.resource != resource:
        raise MetadataError(f"Provider {provider.path} is not part of resource {resource}.")
    md.check_geometry(provider.mediasize, provider.sectorsize, provider.path)
    return md


def metadata_write(provider: Provider, md: Metadata) -> None:
    """Write the whole metadata block (one pwrite of 4096 bytes)."""
    block = md.encode()
    try:
        provider.pwrite(block, 0)
    except OSError as exc:
        raise MetadataError(
            f"Unable to write metadata to {provider.path}: {exc.strerror}."
        ) from exc


class CreateError(HastError):
    """``hastctl create`` refused a resource; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def metadata_create(
    provider: Provider,
    resource: str,
    *,
    mediasize: int = 0,
    extentsize: int = 0,
    keepdirty: int = 0,
    align: int = HAST_DATA_ALIGN,
) -> Metadata:
    """Initialise a provider for HAST, as ``hastctl create`` does (spec 2.1).

    Writes the metadata block (resuid 0, counters 0, prevrole init) and an
    all-zero bitmap; the user data area is not touched.  Zero for a size means
    the default (the whole provider, 2 MiB extents, 64 keepdirty extents).
    The data area starts at a multiple of ``align`` (a power of two; at least
    the sector size).
    """
    sectorsize = provider.sectorsize
    if mediasize == 0:
        mediasize = provider.mediasize
    elif mediasize > provider.mediasize:
        raise CreateError(
            f"Provided mediasize is larger than provider {provider.path} size.", ExitCode.DATAERR
        )
    if sectorsize <= 0 or sectorsize & (sectorsize - 1):
        raise CreateError(
            f"Sector size of provider {provider.path} is not power of 2 ({sectorsize}).",
            ExitCode.DATAERR,
        )
    if extentsize == 0:
        extentsize = HAST_EXTENTSIZE
    if extentsize < sectorsize:
        raise CreateError(
            f"Extent size ({extentsize}) is less than sector size ({sectorsize}).",
            ExitCode.DATAERR,
        )
    if extentsize % sectorsize:
        raise CreateError(
            f"Extent size ({extentsize}) is not multiple of sector size ({sectorsize}).",
            ExitCode.DATAERR,
        )
    if extentsize & (extentsize - 1):
        raise CreateError(f"Extent size ({extentsize}) is not a power of 2.", ExitCode.DATAERR)
    if align <= 0 or align & (align - 1):
        raise CreateError(f"Alignment ({align}) is not a power of 2.", ExitCode.DATAERR)
    if keepdirty == 0:
        keepdirty = HAST_KEEPDIRTY
    if keepdirty > 2**32 - 1:
        raise CreateError(f"Keepdirty ({keepdirty}) is too large.", ExitCode.DATAERR)
    if mediasize % sectorsize:
        mediasize -= mediasize % sectorsize
    mapsize = Activemap.ondisk_size(mediasize - METADATA_SIZE, extentsize, sectorsize)
    unit = max(align, sectorsize)  # (sectors over 4 KiB: sector aligned too)
    localoff = -(-(METADATA_SIZE + mapsize) // unit) * unit
    datasize = mediasize - localoff
    if datasize < sectorsize:
        raise CreateError(
            f"Provider {provider.path} is too small ({mediasize} bytes) for HAST metadata.",
            ExitCode.DATAERR,
        )
    md = Metadata(
        resource=resource,
        datasize=datasize,
        extentsize=extentsize,
        keepdirty=keepdirty,
        localoff=localoff,
    )
    try:
        provider.pwrite(md.encode(), 0)
        provider.pwrite(bytes(localoff - METADATA_SIZE), METADATA_SIZE)
    except OSError as exc:
        raise CreateError(
            f"Unable to store metadata on {provider.path}: {exc.strerror}.", ExitCode.IOERR
        ) from exc
    return md


def bitmap_read(provider: Provider, md: Metadata) -> bytes:
    """Read the on-disk activemap (``mapsize`` bytes at offset 4096)."""
    try:
        return provider.pread(md.mapsize, METADATA_SIZE)
    except OSError as exc:
        raise MetadataError(
            f"Unable to read activemap from {provider.path}: {exc.strerror}."
        ) from exc


def bitmap_write(provider: Provider, bitmap: bytes | bytearray | memoryview) -> None:
    """Write the activemap image at offset 4096 (the caller flushes if metaflush is on)."""
    provider.pwrite(bitmap, METADATA_SIZE)
