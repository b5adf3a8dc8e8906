"""A resolved :class:`~pyhast.config.ResourceConfig` as JSON, for ``--resource``.

The parent passes each worker its resource on the command line
(docs/architecture.md).  The format is one JSON object with every field of
ResourceConfig under its own name; enumerations are written as their labels
("memsync", "crc32", "lzf"), ``sourceaddr`` may be null, ``metaflush`` is a
boolean.  :func:`resource_from_json` accepts exactly what
:func:`resource_to_json` writes and raises ValueError (one sentence) on
anything else.
"""

from __future__ import annotations

import dataclasses
import json

from pyhast.config import ResourceConfig
from pyhast.enums import Checksum, Compression, Replication

__all__ = ["resource_from_json", "resource_to_json"]

_STR_FIELDS = ("name", "provname", "localpath", "remoteaddr", "exec")


def resource_to_json(res: ResourceConfig) -> str:
    """One line of JSON describing ``res``."""
    return json.dumps(
        {
            "name": res.name,
            "provname": res.provname,
            "localpath": res.localpath,
            "remoteaddr": res.remoteaddr,
            "sourceaddr": res.sourceaddr,
            "replication": res.replication.label,
            "checksum": res.checksum.label,
            "compression": res.compression.label,
            "timeout": res.timeout,
            "exec": res.exec,
            "metaflush": res.metaflush,
        },
        separators=(",", ":"),
    )


def resource_from_json(text: str) -> ResourceConfig:
    """Rebuild the ResourceConfig written by :func:`resource_to_json`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"Resource description is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ValueError("Resource description is not a JSON object.")
    expected = {f.name for f in dataclasses.fields(ResourceConfig)}
    if set(data) != expected:
        missing = sorted(expected - set(data))
        extra = sorted(set(data) - expected)
        raise ValueError(
            f"Resource description has wrong fields (missing: {missing}, unknown: {extra})."
        )
    for key in _STR_FIELDS:
        if not isinstance(data[key], str):
            raise ValueError(f"Resource field {key!r} must be a string.")
    source = data["sourceaddr"]
    if source is not None and not isinstance(source, str):
        raise ValueError("Resource field 'sourceaddr' must be a string or null.")
    timeout = data["timeout"]
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("Resource field 'timeout' must be a positive integer.")
    if not isinstance(data["metaflush"], bool):
        raise ValueError("Resource field 'metaflush' must be a boolean.")
    try:
        replication = Replication.from_label(str(data["replication"]))
        checksum = Checksum.from_label(str(data["checksum"]))
        compression = Compression.from_label(str(data["compression"]))
    except ValueError as exc:
        raise ValueError(f"Resource description: {exc}") from None
    return ResourceConfig(
        name=data["name"],
        provname=data["provname"],
        localpath=data["localpath"],
        remoteaddr=data["remoteaddr"],
        sourceaddr=source,
        replication=replication,
        checksum=checksum,
        compression=compression,
        timeout=timeout,
        exec=data["exec"],
        metaflush=data["metaflush"],
    )
