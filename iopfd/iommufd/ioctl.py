"""The cffi binding (``iopfd.uapi_ffi``) and its constants, plus the ioctl call every object uses."""

from __future__ import annotations

import fcntl
from collections.abc import Mapping

from iopfd.iommufd.errors import error_from
from iopfd.uapi_ffi import ffi

# ABI mode: dlopen(None) gives the enum and #define constants of the cdef, no symbols are used.
lib = ffi.dlopen(None)


def new(ctype: str, **fields: int):
    """A zeroed ``struct`` with its leading ``size`` field set, and ``fields``."""
    cdata = ffi.new(f"{ctype} *")
    cdata.size = ffi.sizeof(ctype)
    for name, value in fields.items():
        setattr(cdata, name, value)
    return cdata


def ioctl(fd: int, name: str, cdata, *, size: int | None = None, hints: Mapping[int, str] | None = None) -> None:
    """Issue ioctl ``name`` (a constant of the binding) with ``cdata`` as its in/out argument.

    ``size`` passes fewer bytes than the declared struct (for kernels whose struct is shorter).
    On failure raises the ``IommufdError`` subclass for the errno, with the call's own hint if
    ``hints`` has one for it.
    """
    buffer = ffi.buffer(cdata, size) if size is not None else ffi.buffer(cdata)
    try:
        fcntl.ioctl(fd, getattr(lib, name), buffer, True)
    except OSError as exc:
        raise error_from(name, exc, hints) from None
