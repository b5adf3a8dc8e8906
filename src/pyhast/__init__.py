"""pyhast: highly available storage, a Python reimplementation of FreeBSD HAST.

The package is split by concern (see docs/architecture.md):

* ``wire``      sans-IO codecs: nv lists, frames, the payload pipeline.
* ``disk``      the on-disk format (metadata, activemap) and provider access.
* ``transport`` the only code that touches sockets.
* ``worker``    the per-resource primary and secondary processes.
* ``daemon``    the hastd parent.
* ``frontend``  how applications reach a primary (NBD, FUSE).
* ``cli``       hastctl.
"""

__version__ = "0.1.0"
