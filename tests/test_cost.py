from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtplan.planner.cost.device import (
    COLLECTIVE_KINDS,
    DeviceProfile,
    Link,
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    available_profiles,
    bytes_sent_per_rank,
    collective_time,
    compute_time,
    load_profile,
    reduce_scatter_time,
    to_ns,
)

LINK = Link(bandwidth=1e9, latency=1e-6)


def test_available_profiles() -> None:
    assert available_profiles() == ("a100", "cpu", "h100", "h200")


@pytest.mark.parametrize("name", ["h100", "a100", "cpu"])
def test_load_every_shipped_profile(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.description
    for dtype in ("float32", "bfloat16", "float16"):
        assert profile.flops_per_s(dtype) > 0
    assert profile.memory_bandwidth > 0
    assert profile.memory_capacity > 0
    assert profile.devices_per_node >= 1


def test_h100_numbers() -> None:
    h100 = load_profile("h100")
    assert h100.flops_per_s("bfloat16") == 989e12
    assert h100.flops_per_s("float16") == 989e12
    assert h100.flops_per_s("float32") == 494e12
    assert h100.memory_bandwidth == 3.35e12
    assert h100.memory_capacity == 80 * 2**30
    assert h100.devices_per_node == 8
    assert h100.intra_node == Link(bandwidth=450e9, latency=3e-6)
    assert h100.inter_node == Link(bandwidth=50e9, latency=10e-6)


def test_a100_and_cpu_numbers() -> None:
    a100 = load_profile("a100")
    assert a100.flops_per_s("bfloat16") == 312e12
    assert a100.flops_per_s("float32") == 156e12
    assert a100.intra_node == Link(bandwidth=300e9, latency=3e-6)
    assert a100.inter_node == Link(bandwidth=25e9, latency=10e-6)
    cpu = load_profile("cpu")
    assert cpu.devices_per_node == 4096
    assert cpu.intra_node == cpu.inter_node
    assert "calibration" in cpu.description


def test_flops_dtype_fallback_and_aliases() -> None:
    h100 = load_profile("h100")
    assert h100.flops_per_s("float64") == 494e12
    assert h100.flops_per_s("int8") == 494e12
    assert h100.flops_per_s("torch.bfloat16") == 989e12
    assert h100.flops_per_s("bf16") == 989e12


def test_axis_links_h100() -> None:
    h100 = load_profile("h100")
    intra, inter = h100.intra_node, h100.inter_node
    assert h100.axis_links((8,)) == (intra,)
    assert h100.axis_links((4,)) == (intra,)
    assert h100.axis_links((16,)) == (inter,)
    assert h100.axis_links((8, 8)) == (inter, intra)
    assert h100.axis_links((2, 4)) == (intra, intra)
    # (4,4,4): axis 1 groups are {r, r+4, r+8, r+12} inside 16-rank blocks, which
    # straddle two 8-GPU nodes, so axis 1 is inter-node too.
    assert h100.axis_links((4, 4, 4)) == (inter, inter, intra)
    assert h100.axis_links((8, 2, 4)) == (inter, intra, intra)
    assert h100.axis_links((2, 1, 8)) == (inter, intra, intra)
    # A 3-rank axis does not tile an 8-GPU node: group {6, 7, 8} crosses nodes.
    assert h100.axis_links((4, 3)) == (inter, inter)
    # The whole mesh fits in one node: everything is intra-node.
    assert h100.axis_links((2, 3)) == (intra, intra)


def _axis_crosses_nodes(shape: tuple[int, ...], axis: int, per_node: int) -> bool:
    """Brute force: does any group along `axis` span more than one node?"""
    import itertools

    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    others = [range(s) if i != axis else range(1) for i, s in enumerate(shape)]
    for coord in itertools.product(*others):
        base = sum(c * st for c, st in zip(coord, strides))
        nodes = {(base + k * strides[axis]) // per_node for k in range(shape[axis])}
        if len(nodes) > 1:
            return True
    return False


@pytest.mark.parametrize(
    "shape",
    [(8,), (16,), (2, 4), (8, 8), (4, 4, 4), (4, 3), (2, 3), (3, 8), (2, 2, 2, 2), (6, 4), (1, 16), (5, 2)],
)
def test_axis_links_matches_brute_force(shape: tuple[int, ...]) -> None:
    h100 = load_profile("h100")
    links = h100.axis_links(shape)
    for axis, link in enumerate(links):
        expected = h100.inter_node if _axis_crosses_nodes(shape, axis, 8) else h100.intra_node
        assert link == expected, (shape, axis)


def test_axis_links_cpu_all_intra() -> None:
    cpu = load_profile("cpu")
    assert cpu.axis_links((4, 4, 4)) == (cpu.intra_node,) * 3


def test_axis_links_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"ints >= 1, got \(2, 0\)"):
        load_profile("h100").axis_links((2, 0))


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        load_profile("tpu")
    msg = str(info.value)
    assert "'tpu'" in msg
    assert "a100, cpu, h100, h200" in msg


def test_profile_json_round_trip(tmp_path: Path) -> None:
    h100 = load_profile("h100")
    d = h100.to_json()
    assert d["peak_flops"] == {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}
    assert DeviceProfile.from_json(json.loads(json.dumps(d))) == h100
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(d))
    assert load_profile(str(path)) == h100
    assert load_profile(path) == h100
    assert hash(h100) == hash(load_profile(str(path)))


def test_profile_accepts_mapping_peak_flops() -> None:
    profile = DeviceProfile(
        name="x",
        description="",
        peak_flops={"float32": 1e12, "bfloat16": 2e12},
        memory_bandwidth=1e12,
        memory_capacity=2**30,
        devices_per_node=4,
        intra_node=LINK,
        inter_node=LINK,
    )
    assert profile.peak_flops == (("bfloat16", 2e12), ("float32", 1e12))


def _write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_malformed_profile_missing_key(tmp_path: Path) -> None:
    d = load_profile("h100").to_json()
    del d["memory_bandwidth"]
    path = _write(tmp_path, d)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    msg = str(info.value)
    assert path in msg and "'memory_bandwidth'" in msg and "missing" in msg


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("memory_bandwidth", "fast", "DeviceProfile.memory_bandwidth must be a finite number, got 'fast'"),
        ("memory_bandwidth", 0, "DeviceProfile.memory_bandwidth must be > 0"),
        ("devices_per_node", 0, "DeviceProfile.devices_per_node must be an int >= 1, got 0"),
        ("memory_capacity", 1.5, "DeviceProfile.memory_capacity must be an int >= 1, got 1.5"),
        ("peak_flops", {"bfloat16": 1e12}, "must include 'float32'"),
        ("peak_flops", [1, 2], "'peak_flops' must be an object"),
        ("intra_node", {"bandwidth": 1e9}, "'intra_node' must be an object with exactly"),
        ("inter_node", {"bandwidth": -1, "latency": 0}, "'inter_node': Link.bandwidth must be > 0"),
        ("name", "", "DeviceProfile.name must be a non-empty string"),
    ],
)
def test_malformed_profile_bad_value(tmp_path: Path, key: str, value: object, fragment: str) -> None:
    d = load_profile("h100").to_json()
    d[key] = value
    path = _write(tmp_path, d)
    with pytest.raises(ValueError) as info:
        load_profile(path)
    assert path in str(info.value)
    assert fragment in str(info.value)


def test_malformed_profile_unknown_key_and_bad_json(tmp_path: Path) -> None:
    d = load_profile("h100").to_json()
    d["memory_bandwith"] = 1
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory_bandwith'\]"):
        load_profile(_write(tmp_path, d))
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_profile(_write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="cannot read device profile file"):
        load_profile(str(tmp_path / "missing.json"))


def test_all_reduce_hand_computed() -> None:
    expected = 6e-6 + 1.5 * 32768 / 1e9
    assert all_reduce_time(32768, 4, LINK) == pytest.approx(expected, rel=1e-12)
    assert collective_time("all_reduce", 32768, 4, LINK) == pytest.approx(expected, rel=1e-12)


def test_one_step_collectives_hand_computed() -> None:
    # (p-1)α + (p-1)/p · n/B with p=4, n=32768, B=1e9, α=1e-6
    expected = 3e-6 + 0.75 * 32768 / 1e9
    for fn in (all_gather_time, reduce_scatter_time, all_to_all_time):
        assert fn(32768, 4, LINK) == pytest.approx(expected, rel=1e-12)
    for kind in ("all_gather", "reduce_scatter", "all_to_all"):
        assert collective_time(kind, 32768, 4, LINK) == pytest.approx(expected, rel=1e-12)
    # p=8 over the h100 NVLink link, 1 GiB
    nvlink = Link(bandwidth=450e9, latency=3e-6)
    assert all_gather_time(2**30, 8, nvlink) == pytest.approx(7 * 3e-6 + 7 / 8 * 2**30 / 450e9)
    assert all_reduce_time(2**30, 8, nvlink) == pytest.approx(14 * 3e-6 + 14 / 8 * 2**30 / 450e9)


def test_trivial_collectives_cost_zero() -> None:
    for kind in COLLECTIVE_KINDS:
        assert collective_time(kind, 32768, 1, LINK) == 0.0
        assert collective_time(kind, 0, 4, LINK) == 0.0
        assert bytes_sent_per_rank(kind, 32768, 1) == 0.0


def test_collective_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown collective kind 'broadcast'.*all_reduce"):
        collective_time("broadcast", 1, 2, LINK)
    with pytest.raises(ValueError, match=r"unknown collective kind 'gather'"):
        bytes_sent_per_rank("gather", 1, 2)
    with pytest.raises(ValueError, match="group size must be an int >= 1, got 0"):
        all_reduce_time(1, 0, LINK)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        all_gather_time(-1, 2, LINK)
    with pytest.raises(ValueError, match="Link.bandwidth must be > 0"):
        Link(bandwidth=0, latency=1e-6)
    with pytest.raises(ValueError, match="Link.latency must be >= 0"):
        Link(bandwidth=1e9, latency=-1.0)


def test_bytes_sent_per_rank() -> None:
    assert bytes_sent_per_rank("all_reduce", 32768, 4) == pytest.approx(49152)
    assert bytes_sent_per_rank("all_gather", 32768, 4) == pytest.approx(24576)
    assert bytes_sent_per_rank("reduce_scatter", 32768, 4) == pytest.approx(24576)
    assert bytes_sent_per_rank("all_to_all", 32768, 4) == pytest.approx(24576)


def test_compute_time_is_max_of_bounds() -> None:
    h100 = load_profile("h100")
    # compute bound: 989e12 FLOPs in bf16 -> 1 s; 1 GB of traffic -> ~0.3 ms
    assert compute_time(989e12, 1e9, h100, "bfloat16") == pytest.approx(1.0)
    # memory bound: 3.35e12 bytes -> 1 s; 1e9 FLOPs -> ~1 us
    assert compute_time(1e9, 3.35e12, h100, "bfloat16") == pytest.approx(1.0)
    # dtype matters: same FLOPs take twice as long in float32 (TF32) on h100
    assert compute_time(494e12, 0, h100, "float32") == pytest.approx(1.0)
    assert compute_time(0, 0, h100, "float32") == 0.0
    with pytest.raises(ValueError, match="flops must be >= 0"):
        compute_time(-1, 0, h100, "float32")


def test_to_ns() -> None:
    assert to_ns(1.5e-6) == 1500
    assert to_ns(1.0) == 1_000_000_000
    assert to_ns(2.4e-9) == 2
    assert to_ns(2.6e-9) == 3
    assert to_ns(0.0) == 0
    assert to_ns(-1e-9) == 0
    assert isinstance(to_ns(1e-3), int)
    with pytest.raises(ValueError, match="finite"):
        to_ns(float("inf"))
