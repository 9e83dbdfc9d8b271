"""The ioas-map policy on the host: its options, the window and page arithmetic, and the IOMMU_IOAS_MAP
commands it issues, seen through a fake iommufd that records them (the lab test runs it on a kernel)."""

from __future__ import annotations

import ctypes
import errno

import pytest
from structlog.testing import capture_logs

from iopfd.engine import Engine
from iopfd.engine.batch import batch_of
from iopfd.iommufd import INVALID, LAST_PAGE, PASID_VALID, SUCCESS, Iommufd, IommufdError
from iopfd.iommufd.fault import RECORD, FaultGroup
from iopfd.iommufd.ioctl import lib
from iopfd.iommufd.probe import NO, PAGING_HWPT_FAULTS, UNKNOWN, Feature
from iopfd.policies import IoasMapPolicy, Policies, PolicyError
from iopfd.policies.ioas_map import IoasMapOptions
from iopfd.service.metrics import registry_for
from iopfd_dev.emulated import EmulatedFaultQueue
from server_in_loop import servers_in_loop

PAGE = 4096
WINDOW = 0x1000000


class RecordingIommufd(Iommufd):
    """Records each IOMMU_IOAS_MAP; ``refuse`` maps an IOVA to the errno the kernel would give."""

    def __init__(self) -> None:
        super().__init__(-1, owned=False)
        self.maps: list[dict[str, int]] = []
        self.refuse: dict[int, int] = {}

    def ioctl(self, name: str, cdata, **kwargs) -> None:
        assert name == "IOMMU_IOAS_MAP"
        if cdata.iova in self.refuse:
            raise IommufdError(name, self.refuse[cdata.iova], kwargs.get("hints", {}).get(self.refuse[cdata.iova]))
        self.maps.append({field: getattr(cdata, field) for field in ("flags", "ioas_id", "user_va", "length", "iova")})


@pytest.fixture
def backing(tmp_path):
    """Eight pages, each filled with its own number."""
    path = tmp_path / "backing"
    path.write_bytes(b"".join(bytes([i]) * PAGE for i in range(8)))
    return path


def options(file, **changes) -> dict:
    return {"ioas_id": 2, "iova": WINDOW, "length": 4 * PAGE, "backing": str(file), "backing_offset": 2 * PAGE,
            **changes}


def build(backing, **changes) -> IoasMapPolicy:
    return IoasMapPolicy("demand", IoasMapOptions.model_validate(options(backing, **changes)))


def group(*addresses: int, pasid: int | None = None, queue: str = "vm1") -> FaultGroup:
    flags = PASID_VALID if pasid is not None else 0
    records = [RECORD.pack(flags | (LAST_PAGE if i == len(addresses) - 1 else 0), 7, pasid or 0, 1, 1, 0, addr, 0, 5)
               for i, addr in enumerate(addresses)]
    return FaultGroup(5, b"".join(records), queue)


def table_errors(file, **changes) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        Policies({"demand": ("ioas-map", options(file, **changes))}).get("demand")
    return info.value.lines


def test_the_window_maps_to_the_backing_at_the_same_offset(backing):
    policy = build(backing)
    assert [policy.page_of(a) for a in (WINDOW, WINDOW + 5, WINDOW + 3 * PAGE + 4095)] == \
        [WINDOW, WINDOW, WINDOW + 3 * PAGE]
    assert [policy.page_of(a) for a in (WINDOW - 1, WINDOW + 4 * PAGE, 0, (1 << 64) - 1)] == [None] * 4
    # The bytes at the user VA are the file's: page 3 of the window is page 2 + 3 of the backing.
    assert ctypes.string_at(policy.user_va_of(WINDOW + 3 * PAGE), PAGE) == bytes([5]) * PAGE


@pytest.mark.asyncio
async def test_a_fault_in_the_window_maps_its_page_then_succeeds(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    assert await policy.decide(group(WINDOW + PAGE + 0x123)) == SUCCESS
    flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE | lib.IOMMU_IOAS_MAP_WRITEABLE
    assert ctx.maps == [{"flags": flags, "ioas_id": 2, "user_va": policy.user_va_of(WINDOW + PAGE), "length": PAGE,
                         "iova": WINDOW + PAGE}]
    assert policy.counts == {"mapped": 1, "already_mapped": 0, "outside_window": 0}


@pytest.mark.asyncio
async def test_a_group_maps_each_page_once_and_read_only_when_configured(backing):
    policy, ctx = build(backing, writeable=False), RecordingIommufd()
    policy.bind("vm1", ctx)
    assert await policy.decide(group(WINDOW + 2 * PAGE + 8, WINDOW, WINDOW + 2 * PAGE)) == SUCCESS
    assert [(m["iova"], m["flags"]) for m in ctx.maps] == [
        (WINDOW, lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE),
        (WINDOW + 2 * PAGE, lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE)]


@pytest.mark.asyncio
async def test_a_page_already_mapped_counts_as_served(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    ctx.refuse[WINDOW] = errno.EEXIST
    assert await policy.decide(group(WINDOW + 8)) == SUCCESS
    assert policy.counts["already_mapped"] == 1 and ctx.maps == []


@pytest.mark.asyncio
async def test_any_other_map_error_answers_its_groups_invalid_and_logs_the_cause(backing):
    policy, ctx = build(backing, page_size=1024, iova=WINDOW, length=4096, backing_offset=0), RecordingIommufd()
    policy.bind("vm1", ctx)
    ctx.refuse[WINDOW] = errno.EINVAL  # e.g. a page_size below the IOAS's IOVA alignment
    with capture_logs() as logs:
        assert await policy.decide(group(WINDOW)) == INVALID
    assert [entry["error"] for entry in logs if entry["log_level"] == "error"] == [
        "IOMMU_IOAS_MAP failed: EINVAL (Invalid argument): user_va, length and iova must be aligned to the IOAS's "
        "iova alignment"]


def test_a_batch_maps_each_run_of_consecutive_pages_once(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    groups = [group(WINDOW + PAGE + 8), group(WINDOW + 8, WINDOW + 2 * PAGE), group(WINDOW + PAGE),
              group(WINDOW + 4 * PAGE)]  # the last one is outside the window
    codes = policy.decide_batch(batch_of(groups))
    assert codes.tolist() == [SUCCESS, SUCCESS, SUCCESS, INVALID]
    assert [(m["iova"], m["length"], m["user_va"]) for m in ctx.maps] == [(WINDOW, 3 * PAGE, policy.user_va_of(WINDOW))]
    assert policy.counts == {"mapped": 3, "already_mapped": 0, "outside_window": 1}


def test_a_run_with_a_page_mapped_already_is_mapped_page_by_page(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    ctx.refuse[WINDOW] = errno.EEXIST  # the run's first page, and so the whole run's map
    codes = policy.decide_batch(batch_of([group(WINDOW), group(WINDOW + PAGE), group(WINDOW + 2 * PAGE)]))
    assert codes.tolist() == [SUCCESS] * 3
    assert [(m["iova"], m["length"]) for m in ctx.maps] == [(WINDOW + PAGE, PAGE), (WINDOW + 2 * PAGE, PAGE)]
    assert policy.counts == {"mapped": 2, "already_mapped": 1, "outside_window": 0}


def test_the_metrics_have_each_ioas_map_policys_pages_and_groups_outside_its_window(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    ctx.refuse[WINDOW] = errno.EEXIST
    policy.decide_batch(batch_of([group(WINDOW), group(WINDOW + PAGE), group(WINDOW + 4 * PAGE)]))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in registry_for(Engine(), None, lambda: {"demand": policy, "other": Policies({}).get("accept")})
               .collect() for s in m.samples}
    assert samples[("iopfd_ioas_map_pages_total", (("policy", "demand"), ("result", "mapped")))] == 1
    assert samples[("iopfd_ioas_map_pages_total", (("policy", "demand"), ("result", "already_mapped")))] == 1
    assert samples[("iopfd_ioas_map_outside_window_groups_total", (("policy", "demand"),))] == 1
    assert not [key for key in samples if ("policy", "other") in key[1]]  # only ioas-map policies have these


@pytest.mark.asyncio
async def test_a_fault_outside_the_window_is_invalid_and_maps_nothing(backing):
    policy, ctx = build(backing), RecordingIommufd()
    policy.bind("vm1", ctx)
    assert await policy.decide(group(WINDOW, WINDOW + 4 * PAGE, pasid=3)) == INVALID  # one page of the group outside
    assert ctx.maps == [] and policy.counts["outside_window"] == 1


@pytest.mark.asyncio
async def test_each_queue_maps_into_its_own_iommufd(backing):
    policy, first, second = build(backing), RecordingIommufd(), RecordingIommufd()
    policy.bind("vm1", first)
    policy.bind("vm2", second)
    await policy.decide(group(WINDOW, queue="vm2"))
    assert (len(first.maps), len(second.maps)) == (0, 1)
    policy.unbind("vm2")
    with pytest.raises(RuntimeError, match="not bound to queue 'vm2'"):
        await policy.decide(group(WINDOW, queue="vm2"))


def test_a_queue_without_an_iommufd_is_refused_with_the_way_out(backing):
    with pytest.raises(ValueError, match="broker"):
        build(backing).bind("vm1", None)


def test_rules_bind_their_sub_policies(backing):
    policies = Policies({"demand": ("ioas-map", options(backing)),
                         "route": ("rules", {"rules": [{"pasid": [1], "policy": "demand"},
                                                       {"pasid": [2], "policy": "demand"}]})})
    route, ctx = policies.get("route"), RecordingIommufd()
    route.bind("vm1", ctx)
    assert policies.get("demand")._iommufds == {"vm1": ctx}
    with pytest.raises(ValueError, match="broker"):
        route.bind("vm2", None)
    route.unbind("vm1")
    assert policies.get("demand")._iommufds == {}


@pytest.mark.parametrize(("changes", "message"), [
    ({"iova": WINDOW + 8}, "iova 0x1000008 is not a multiple of page_size 0x1000; round it to 0x1000000 or 0x1001000"),
    ({"length": 100}, "length 0x64 is not a multiple of page_size"),
    ({"backing_offset": 2048}, "backing_offset 0x800 is not a multiple of page_size"),
    ({"page_size": 3000}, "page_size 3000 is not a power of two"),
    ({"iova": (1 << 64) - PAGE, "length": 2 * PAGE}, "runs past the 64-bit IOVA space"),
    ({"readable": False, "writeable": False}, "a mapping needs at least one"),
])
def test_bad_options_are_config_errors_naming_the_fix(backing, changes, message):
    ((path, text),) = table_errors(backing, **changes)
    assert path == "policies.demand" and message in text


def test_unknown_and_missing_keys_name_their_field(backing):
    lines = dict(table_errors(backing, ioas=2, ioas_id=None))
    assert set(lines) == {"policies.demand.ioas", "policies.demand.ioas_id"}


def test_a_missing_or_short_backing_is_a_config_error(backing, tmp_path):
    ((path, text),) = table_errors(backing, backing=str(tmp_path / "nope"))
    assert path == "policies.demand" and "No such file" in text
    ((_, text),) = table_errors(backing, backing_offset=6 * PAGE)
    assert "has 0x8000 bytes; the window needs [0x6000, 0xa000)" in text


def test_a_kernel_without_faults_on_paging_hwpts_refuses_the_policy(backing, monkeypatch):
    monkeypatch.setattr("iopfd.iommufd.probe.probe", lambda: [
        Feature(PAGING_HWPT_FAULTS, NO, "IOMMU_HWPT_ALLOC failed: EOPNOTSUPP")])
    ((path, text),) = table_errors(backing)
    assert path == "policies.demand" and "Linux 6.13+" in text and "EOPNOTSUPP" in text


def test_a_kernel_the_probe_cannot_judge_only_gets_a_warning(backing, monkeypatch):
    monkeypatch.setattr("iopfd.iommufd.probe.probe", lambda: [Feature(PAGING_HWPT_FAULTS, UNKNOWN, "no mock")])
    assert isinstance(Policies({"demand": ("ioas-map", options(backing))}).get("demand"), IoasMapPolicy)


@pytest.mark.asyncio
async def test_the_daemon_binds_the_queue_and_refuses_one_it_holds_no_iommufd_for(tmp_path, backing):
    async with servers_in_loop(tmp_path, watch_devices=False,
                               policies={"demand": {"type": "ioas-map", **options(backing)}}) as start:
        server, _ = await start()
        with pytest.raises(PolicyError, match=r"queue 'vm1' policy: .*ask for queue 'vm1' with the control socket's "
                                              "broker"):
            server.queues.add("vm1", EmulatedFaultQueue().open(), policy="demand")
        assert server.engine.queues == {}  # nothing half-added
        ctx = RecordingIommufd()
        server.queues.add("vm2", EmulatedFaultQueue().open(), policy="demand", iommufd=ctx)
        demand = server.policies.get("demand")
        assert demand._iommufds == {"vm2": ctx}
        await server.queues.remove("vm2")
        assert demand._iommufds == {}
