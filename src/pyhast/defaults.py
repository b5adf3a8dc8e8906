"""Constants shared by every part of pyhast, named as in FreeBSD's hast.h."""

from typing import Final

#: Protocol version we speak (FreeBSD hastd, post-2013 memsync code base).
HAST_PROTO_VERSION: Final = 2
#: Default configuration file.
HAST_CONFIG: Final = "/etc/hast.conf"
#: Default control socket address.
HAST_CONTROL: Final = "uds:///var/run/hastctl"
#: Default pidfile.
HASTD_PIDFILE: Final = "/var/run/hastd.pid"
#: Default TCP port for listen and remote addresses.
HASTD_PORT: Final = 8457
#: Default listen addresses (each used only if the kernel supports the family).
HASTD_LISTEN_TCP4: Final = "tcp4://0.0.0.0:8457"
HASTD_LISTEN_TCP6: Final = "tcp6://[::]:8457"
#: Default socket timeout in seconds.
HAST_TIMEOUT: Final = 20
#: Keepalive interval in seconds (also the reconnect interval).
HAST_KEEPALIVE: Final = 10
#: Size of the metadata block at offset 0 of every provider.
METADATA_SIZE: Final = 4096
#: Default extent size (2 MiB).
HAST_EXTENTSIZE: Final = 2 * 1024 * 1024
#: Default size of the keepdirty MRU list.
HAST_KEEPDIRTY: Final = 64
#: hastctl create starts the data area at a multiple of this (FreeBSD: of
#: the sector size, so 4608 on a 512-byte-sector provider, where every 4 KiB
#: write straddles two pages and two 4 KiB physical sectors).
HAST_DATA_ALIGN: Final = 4096
#: Largest request on the wire (MAXPHYS of 64-bit FreeBSD 13+).
MAXPHYS: Final = 1024 * 1024
#: Length of the handshake token.
HAST_TOKEN_SIZE: Final = 16
#: Sector size assumed for regular files.
FILE_SECTORSIZE: Final = 512
#: Default mount point of the FUSE device directory.
HAST_DEVDIR: Final = "/dev/hast"
