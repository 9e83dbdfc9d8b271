"""The control requests' checks, called directly: what each field must be, and the code a peer gets."""

from __future__ import annotations

import pytest

from iopfd import protocol
from iopfd.iommufd.viommu import SELFTEST
from iopfd.protocol import ProtocolError
from iopfd.service.control import requests
from iopfd.service.control.ops import OPS


def refused(check, *args) -> tuple[str, str]:
    with pytest.raises(ProtocolError) as error:
        check(*args)
    return error.value.code, error.value.message


def test_an_attach_or_broker_request_is_checked_field_by_field():
    request = {"queue": "vm1", "policy": "vmm", "labels": {"vm": "guest1"}, "devices": {"4": "vfio0"}}
    assert requests.new_queue(request) == requests.NewQueue("vm1", "vmm", {"vm": "guest1"}, {4: "vfio0"})
    assert requests.new_queue({"queue": "vm1"}) == requests.NewQueue("vm1", None, {}, {})
    assert refused(requests.new_queue, {"queue": "no spaces"})[0] == "bad-request"
    assert refused(requests.new_queue, {"queue": "vm1", "policy": 7}) == ("bad-request", "policy: a policy name, got 7")
    assert refused(requests.new_queue, {"queue": "vm1", "policy": "a b"})[0] == "no-such-policy"
    assert "use another key" in refused(requests.new_queue, {"queue": "vm1", "labels": {"queue": "x"}})[1]
    assert refused(requests.new_queue, {"queue": "vm1", "labels": {"vm": 1}})[0] == "bad-request"
    assert "dev_ids in decimal, got '0x4'" in refused(requests.new_queue, {"queue": "vm1", "devices": {"0x4": "v"}})[1]


def test_attach_carries_one_or_two_fds_and_a_second_needs_its_type():
    requests.attach_fds([5])
    requests.attach_fds([5, 6])
    assert refused(requests.attach_fds, [])[0] == refused(requests.attach_fds, [5, 6, 7])[0] == "missing-fd"
    assert requests.veventq_type({}, has_fd=False) is None
    assert requests.veventq_type({"veventq_type": "selftest"}, has_fd=True) == SELFTEST
    assert refused(requests.veventq_type, {"veventq_type": "selftest"}, False)[0] == "missing-fd"
    assert refused(requests.veventq_type, {}, True)[0] == "bad-request"


def test_a_forward_request_is_checked():
    assert requests.forward({"policy": "vmm"}) == requests.Forward("vmm", protocol.DEFAULT_READ_RECORDS, False)
    assert requests.forward({"policy": "vmm", "read_records": 64, "events": True}) == requests.Forward("vmm", 64, True)
    for bad in ({}, {"policy": "vmm", "read_records": 0}, {"policy": "vmm", "read_records": True},
                {"policy": "vmm", "events": 1}):
        assert refused(requests.forward, bad)[0] == "bad-request", bad


def test_an_id_is_echoed_only_while_small_and_shallow():
    assert requests.echoable(1) and requests.echoable({"a": [1, "x"]}) and requests.echoable(None)
    assert not requests.echoable("x" * (protocol.MAX_ID + 1))
    deep: list = []
    for _ in range(protocol.MAX_ID_DEPTH):
        deep = [deep]
    assert not requests.echoable(deep) and requests.echoable(deep[0])


def test_only_attach_takes_fds():
    assert [name for name, op in OPS.items() if op.takes_fds] == ["attach"]
    assert set(OPS) == {"attach", "detach", "broker", "status", "forward"}  # docs/protocol.md's ops
