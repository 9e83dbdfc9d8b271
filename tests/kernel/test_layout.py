"""The binding's struct layouts and constants equal the lab kernel's real uapi headers.

A C program is generated from what ``iopfd.uapi_ffi.ffi`` declares, compiled against the headers that
``make headers_install`` produced for the lab kernel (plus the selftest's ``iommufd_test.h`` from the
same source tree), and run: every sizeof, offsetof and constant must match. Declarations that this
kernel does not have (newer uapi, or a selftest flag a newer kernel dropped) are listed per kernel;
the test proves they really are absent and that a struct which later grew ends exactly where the
newer field starts. It runs once per lab kernel.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from iopfd.engine.batch import record_dtype
from iopfd.iommufd.ioctl import lib
from iopfd.uapi_ffi import ffi

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(3600)]

# What the binding declares but each lab kernel's uapi does not have.
ABSENT = {
    "6.12": {
        "structs": {"iommu_viommu_alloc", "iommu_vdevice_alloc", "iommu_veventq_alloc", "iommufd_vevent_header",
                    "iommu_viommu_event_selftest"},
        "fields": {"iommu_hwpt_selftest": {"pagetable_type"},
                   "iommu_test_cmd": {"trigger_vevent", "pasid_attach", "pasid_replace", "pasid_detach",
                                      "pasid_check"}},
        "constants": {
            "IOMMU_HWPT_ALLOC_PASID", "IOMMU_VIOMMU_ALLOC", "IOMMU_VDEVICE_ALLOC", "IOMMU_VEVENTQ_ALLOC",
            "IOMMU_IOAS_MAP_FILE", "IOMMU_IOAS_CHANGE_PROCESS", "IOMMU_HW_QUEUE_ALLOC",
            "IOMMU_VIOMMU_TYPE_DEFAULT", "IOMMU_VIOMMU_TYPE_ARM_SMMUV3", "IOMMU_VEVENTQ_TYPE_DEFAULT",
            "IOMMU_VEVENTQ_TYPE_ARM_SMMUV3", "IOMMU_VEVENTQ_FLAG_LOST_EVENTS", "IOMMU_TEST_OP_TRIGGER_VEVENT",
            "IOMMU_TEST_OP_PASID_ATTACH", "IOMMU_TEST_OP_PASID_REPLACE", "IOMMU_TEST_OP_PASID_DETACH",
            "IOMMU_TEST_OP_PASID_CHECK_HWPT",
            "MOCK_FLAGS_DEVICE_PASID", "MOCK_PASID_WIDTH", "IOMMU_VIOMMU_TYPE_SELFTEST", "IOMMU_VEVENTQ_TYPE_SELFTEST",
        },
    },
    # The mock's HUGE_IOVA device flag gave way to iommu_hwpt_selftest.pagetable_type.
    "7.3": {"structs": set(), "fields": {}, "constants": {"MOCK_FLAGS_DEVICE_HUGE_IOVA"}},
}
# The bench's C programs' own layouts (the only header in the repository).
BENCH_HEADER = Path(__file__).resolve().parents[2] / "tooling" / "iopfd_dev" / "bench" / "c" / "bench.h"
INCLUDES = "#include <stddef.h>\n#include <stdio.h>\n#include <linux/iommufd.h>\n"


@pytest.fixture(scope="module")
def absent(built):
    return ABSENT[built.kernel.name]


def declared_fields(ctype, prefix: str = "", base: int = 0):
    """(dotted path, offset) of every field, nested structs of anonymous unions included."""
    ctype = ffi.typeof(ctype) if isinstance(ctype, str) else ctype
    for name, field in ctype.fields:
        path = f"{prefix}{name}"
        yield path, base + field.offset
        if field.type.kind == "struct":
            yield from declared_fields(field.type, f"{path}.", base + field.offset)


def kernel_size(ctype: str, missing: set[str]) -> int:
    """The struct's size in a kernel without the ``missing`` fields: where they are its tail (the struct grew
    later), it ends where the first of them starts; fields missing from a union leave the size as it is."""
    names = [name for name, _ in ffi.typeof(ctype).fields]
    for index, name in enumerate(names):
        if name in missing and all(later in missing for later in names[index:]):
            return ffi.offsetof(ctype, name)
    return ffi.sizeof(ctype)


def compile_and_run(built, body: str, tmp_path: Path, name: str = "layout") -> subprocess.CompletedProcess:
    source = tmp_path / f"{name}.c"
    source.write_text(f'{INCLUDES}#include "{built.selftest_header}"\nint main(void) {{\n{body}\nreturn 0;\n}}\n')
    binary = tmp_path / name
    result = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", str(built.headers), "-o", str(binary),
                             str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        return result
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True)


def test_struct_sizes_and_field_offsets_match_the_kernel_headers(built, absent, tmp_path):
    expected: dict[str, int] = {}
    lines = []
    for struct_name in ffi.list_types()[1]:
        if struct_name in absent["structs"]:
            continue
        ctype = f"struct {struct_name}"
        missing = absent["fields"].get(struct_name, set())
        for path, offset in declared_fields(ctype):
            if path.split(".")[0] not in missing:
                lines.append(f'printf("offsetof {struct_name}.{path} %zu\\n", offsetof({ctype}, {path}));')
                expected[f"offsetof {struct_name}.{path}"] = offset
        lines.append(f'printf("sizeof {struct_name} %zu\\n", sizeof({ctype}));')
        expected[f"sizeof {struct_name}"] = kernel_size(ctype, missing)
    result = compile_and_run(built, "\n".join(lines), tmp_path)
    assert result.returncode == 0, result.stderr
    actual = {key: int(value) for key, value in (line.rsplit(" ", 1) for line in result.stdout.splitlines())}
    assert actual == expected
    assert len(actual) > 100  # every struct and field was really checked


def test_the_numpy_record_dtype_matches_the_kernel_headers(built, tmp_path):
    """The engine's columns (``record_dtype``) are struct iommu_hwpt_pgfault field by field: the same
    names, offsets, sizes and order, and no padding of its own."""
    dtype = record_dtype()
    lines = [f'printf("{name} %zu %zu\\n", offsetof(struct iommu_hwpt_pgfault, {name}), '
             f'sizeof(((struct iommu_hwpt_pgfault *)0)->{name}));' for name in dtype.names if name != "reserved"]
    lines.append('printf("__reserved %zu %zu\\n", offsetof(struct iommu_hwpt_pgfault, __reserved), '
                 'sizeof(((struct iommu_hwpt_pgfault *)0)->__reserved));')
    lines.append('printf("sizeof %zu 0\\n", sizeof(struct iommu_hwpt_pgfault));')
    result = compile_and_run(built, "\n".join(lines), tmp_path, "dtype")
    assert result.returncode == 0, result.stderr
    actual = {name: (int(offset), int(size)) for name, offset, size in
              (line.split() for line in result.stdout.splitlines())}
    expected = {("__reserved" if name == "reserved" else name): (dtype.fields[name][1], dtype.fields[name][0].itemsize)
                for name in dtype.names}
    assert actual == expected | {"sizeof": (dtype.itemsize, 0)}
    assert [dtype.fields[name][1] for name in dtype.names] == sorted(dtype.fields[name][1] for name in dtype.names)


def test_the_bench_c_programs_layouts_match_the_kernel_headers(built, tmp_path):
    """bench.h declares the fault record, the page response and their constants itself: field by
    field and value by value they are the kernel's."""
    fields = [name for name in record_dtype().names if name != "reserved"]
    pairs = [("struct pgfault", "struct iommu_hwpt_pgfault", fields),
             ("struct page_response", "struct iommu_hwpt_page_response", ["cookie", "code"])]
    lines = []
    for ours, theirs, names in pairs:
        label = ours.removeprefix("struct ")
        lines.append(f'printf("{label} %d\\n", sizeof({ours}) == sizeof({theirs}));')
        lines += [f'printf("{label}.{name} %d\\n", offsetof({ours}, {name}) == offsetof({theirs}, {name}) && '
                  f'sizeof((({ours} *)0)->{name}) == sizeof((({theirs} *)0)->{name}));' for name in names]
    constants = {"LAST_PAGE": "IOMMU_PGFAULT_FLAGS_LAST_PAGE", "SUCCESS": "IOMMUFD_PAGE_RESP_SUCCESS",
                 "INVALID": "IOMMUFD_PAGE_RESP_INVALID"}
    lines += [f'printf("{ours} %d\\n", {ours} == {theirs});' for ours, theirs in constants.items()]
    source = tmp_path / "bench_layout.c"
    source.write_text(f'#include "{BENCH_HEADER}"\n{INCLUDES}int main(void) {{\n' + "\n".join(lines)
                      + "\nreturn 0;\n}\n")
    result = subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", str(built.headers), "-o",
                             str(tmp_path / "bench_layout"), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    checked = dict(line.split() for line in subprocess.run([str(tmp_path / "bench_layout")], capture_output=True,
                                                            text=True, check=True).stdout.splitlines())
    assert len(checked) == 2 + len(fields) + 2 + len(constants)
    assert [what for what, same in checked.items() if same != "1"] == []


def test_constants_match_the_kernel_headers(built, absent, tmp_path):
    names = [name for name in dir(lib) if name not in absent["constants"]]
    body = "\n".join(f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in names)
    result = compile_and_run(built, body, tmp_path)
    assert result.returncode == 0, result.stderr
    actual = {key: int(value) for key, value in (line.split() for line in result.stdout.splitlines())}
    assert actual == {name: getattr(lib, name) for name in names}
    assert len(actual) >= 50


def test_declarations_listed_as_absent_are_really_absent_from_this_kernel(built, absent, tmp_path):
    probes = {f"struct {s}": f"struct {s} probe; (void)probe;" for s in absent["structs"]}
    probes |= {f"{s}.{f}": f"(void)offsetof(struct {s}, {f});" for s, fields in absent["fields"].items()
               for f in fields}
    probes |= {c: f"(void)({c});" for c in absent["constants"]}
    present = [what for index, (what, body) in enumerate(sorted(probes.items()))
               if compile_and_run(built, body, tmp_path, f"absent{index}").returncode == 0]
    assert present == [], f"now in the kernel headers, so check them: remove from ABSENT[{built.kernel.name!r}]"


def test_no_kernel_header_is_in_the_repository():
    """The one header tracked is the bench's own (its layouts are checked above), and it includes no
    kernel text."""
    repo = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert [p for p in tracked if p.endswith(".h")] == [str(BENCH_HEADER.relative_to(repo))]
    assert "SPDX" not in BENCH_HEADER.read_text() and "Linux-syscall-note" not in BENCH_HEADER.read_text()
