"""Splitting fault-fd bytes into groups, without a kernel."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iopfd.engine.batch import whole_groups
from iopfd.iommufd import LAST_PAGE, PASID_VALID, MalformedFaultData, parse_groups
from iopfd.iommufd.fault import RECORD, assemble_groups


def record(cookie: int, *, last: bool = True, flags: int = 0, dev_id: int = 3, pasid: int = 0, grpid: int = 1,
           perm: int = 1, addr: int = 0x1000) -> bytes:
    return RECORD.pack(flags | (LAST_PAGE if last else 0), dev_id, pasid, grpid, perm, 0, addr, 0, cookie)


def test_multi_record_group_keeps_order_and_ends_at_last_page():
    data = record(5, last=False, addr=0x1000) + record(5, last=False, addr=0x2000) + record(5, addr=0x3000) + record(6)
    first, second = parse_groups(data)
    assert first.cookie == 5 and [f.addr for f in first.faults] == [0x1000, 0x2000, 0x3000]
    assert second.cookie == 6 and len(second.faults) == 1


def test_unknown_flag_bits_are_masked():
    (group,) = parse_groups(record(1, flags=PASID_VALID | 0x4 | 0x80000000))
    assert group.faults[0].flags == PASID_VALID | LAST_PAGE
    assert group.faults[0].pasid_valid


def test_empty_read_is_no_groups():
    assert parse_groups(b"") == []


@pytest.mark.parametrize(("data", "message"), [
    (record(1)[:-1], "not a whole number"),
    (record(1, last=False), "no LAST_PAGE"),
    (record(1, last=False) + record(2), "ends without LAST_PAGE before cookie 2"),
    (record(0), "cookie 0"),
])
def test_malformed_reads_are_refused_with_the_reason(data, message):
    with pytest.raises(MalformedFaultData, match=message):
        parse_groups(data)


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(1, 8)), max_size=40, unique_by=lambda g: g[0]))
def test_any_sequence_of_whole_groups_round_trips(groups):
    data = b"".join(record(cookie, last=i == size - 1, addr=i * 4096)
                    for cookie, size in groups for i in range(size))
    parsed = parse_groups(data)
    assert [(g.cookie, len(g.faults)) for g in parsed] == groups
    assert all([f.addr for f in g.faults] == [i * 4096 for i in range(len(g.faults))] for g in parsed)


@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=60))
def test_assembly_accounts_for_every_cookie_of_any_record_sequence(records):
    """Whatever the bytes, every nonzero cookie ends in exactly one whole group or once in the
    malformed list (so the engine answers it once), and a group is one cookie's run to LAST_PAGE."""
    data = b"".join(record(cookie, last=last, addr=i) for i, (cookie, last) in enumerate(records))
    groups, malformed = assemble_groups(data, "q")
    grouped = [g.cookie for g in groups]
    flagged = [cookie for cookie, _ in malformed if cookie]
    assert sorted(set(grouped + flagged)) == sorted({cookie for cookie, _ in records if cookie})
    assert len(set(flagged)) == len(flagged) and len(set(grouped)) == len(grouped)
    assert not set(flagged) & set(grouped)
    for group in groups:
        assert group.queue == "q" and group.cookie != 0
        assert [f.flags & LAST_PAGE for f in group.faults][-1] and \
            not any(f.flags & LAST_PAGE for f in group.faults[:-1])


@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=60))
def test_the_engines_numpy_assembly_agrees_with_this_one(records):
    """whole_groups() (the engine's columns) cuts any read into the same groups, and reports the same
    malformed cookies, as assemble_groups()."""
    data = b"".join(record(cookie, last=last, addr=i) for i, (cookie, last) in enumerate(records))
    groups, malformed = assemble_groups(data, "q")
    raw, first, last, columnar_malformed = whole_groups(data)
    assert sorted(dict(columnar_malformed)) == sorted(dict(malformed))  # the same cookies (reasons may word it apart)
    spans = zip(first.tolist(), last.tolist())
    assert [raw[start * RECORD.size:(end + 1) * RECORD.size] for start, end in spans] == \
        [group.records for group in groups]
