"""Generate ``iopfd/uapi_ffi.py`` from ``bindings/iommufd.cdef`` (cffi out-of-line ABI mode).

ABI mode needs no C compiler at install time: the generated module is plain Python holding the
parsed types. It is committed; tests/unit/test_binding.py fails when it is stale.

    uv run python bindings/build_uapi.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

BINDINGS = Path(__file__).resolve().parent
CDEF = BINDINGS / "iommufd.cdef"
TARGET = BINDINGS.parent / "iopfd" / "uapi_ffi.py"


def make_ffibuilder() -> cffi.FFI:
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF.read_text())
    ffibuilder.set_source("iopfd.uapi_ffi", None)
    return ffibuilder


def generate(target: Path = TARGET) -> None:
    make_ffibuilder().emit_python_code(str(target))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
