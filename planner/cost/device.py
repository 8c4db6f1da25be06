"""Alpha-beta cost model for collectives and a roofline compute model.

Device profiles are data: JSON files in ``planner/cost/profiles/`` (or any path).
All times are in seconds; ``to_ns`` converts to the integer nanoseconds used
by the integer program.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Link",
    "DeviceProfile",
    "PROFILES_DIR",
    "COLLECTIVE_KINDS",
    "SECONDS_TO_NS",
    "available_profiles",
    "load_profile",
    "all_reduce_time",
    "all_gather_time",
    "reduce_scatter_time",
    "all_to_all_time",
    "collective_time",
    "bytes_sent_per_rank",
    "compute_time",
    "to_ns",
]

PROFILES_DIR = Path(__file__).parent / "profiles"
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
SECONDS_TO_NS = 1e9

_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "tf32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}


@dataclass(frozen=True, slots=True)
class Link:
    """One interconnect level: per-device one-direction bandwidth and latency."""

    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds

    def __post_init__(self) -> None:
        _require_number("Link.bandwidth", self.bandwidth, positive=True)
        _require_number("Link.latency", self.latency, positive=False)

    def to_json(self) -> dict[str, float]:
        """Return {"bandwidth": ..., "latency": ...}."""
        return {"bandwidth": self.bandwidth, "latency": self.latency}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """Hardware numbers for one device type and its interconnect.

    ``peak_flops`` is stored as sorted ``(dtype_name, FLOP/s)`` pairs; a mapping
    is accepted and converted. It must contain "float32" (the fallback dtype).
    """

    name: str
    description: str
    peak_flops: tuple[tuple[str, float], ...]
    memory_bandwidth: float  # bytes/s
    memory_capacity: int  # bytes
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    #: the fraction by which compute slows while a collective runs under it
    #: (the hidden communication costs this fraction of itself; calibrated)
    overlap_slowdown: float = 0.0
    #: ranks drift apart as they compute: a collective starts this fraction of
    #: the compute since the previous one later than a rank issues it (calibrated)
    rank_skew: float = 0.0
    #: measured (`dtplan calibrate`), all optional: the least time an op that
    #: does work takes (dispatch, kernel launch); FLOP/s by dtype and by an op's
    #: FLOPs (keys "float32", ...: matmuls; "convolution/float32",
    #: "convolution_backward/float32": convolutions; "attention/float32", ...: fused
    #: attention, forward and backward, by head dimension, with
    #: "attention_rows/float32", ...: its query rows per second besides its
    #: FLOPs), and memory bandwidth by dtype and by
    #: the bytes an op moves, as sorted (size, rate) points interpolated in
    #: log-log (clamped at the ends; `peak_flops` and `memory_bandwidth` where
    #: absent); each collective's link by group size ("2": {"all_gather":
    #: Link, ...}) for axes inside a node
    op_launch_s: float = 0.0
    flops_curve: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    bandwidth_curve: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    collectives: tuple[tuple[int, tuple[tuple[str, Link], ...]], ...] = ()
    #: each collective's measured seconds by bytes (plan-file convention), by
    #: group size ("2": {"all_reduce": [[bytes, seconds], ...]}): priced by
    #: interpolation in log-log where present (the ring model's two figures
    #: miss mid sizes by up to 2x on gloo), linearly in bytes past the largest
    collective_curves: tuple[tuple[int, tuple[tuple[str, tuple[tuple[float, float], ...]], ...]], ...] = ()
    #: where each figure comes from (field -> "datasheet", "measured by ...")
    sources: tuple[tuple[str, str], ...] = ()
    #: the host dispatches each op on the thread that computes it (a CPU; set
    #: by `dtplan calibrate` there): an op that only makes a view (no FLOPs,
    #: no bytes) still costs `op_launch_s`. On a GPU the host runs ahead of
    #: the kernels and such ops cost the step nothing.
    dispatch_serial: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", _normalise_flops(self.peak_flops))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"DeviceProfile.description must be a string, got {self.description!r}")
        _require_number("DeviceProfile.memory_bandwidth", self.memory_bandwidth, positive=True)
        _require_int("DeviceProfile.memory_capacity", self.memory_capacity)
        _require_int("DeviceProfile.devices_per_node", self.devices_per_node)
        _require_number("DeviceProfile.overlap_slowdown", self.overlap_slowdown, positive=False)
        _require_number("DeviceProfile.op_launch_s", self.op_launch_s, positive=False)
        _require_number("DeviceProfile.rank_skew", self.rank_skew, positive=False)
        object.__setattr__(self, "flops_curve", tuple(sorted((_canonical_dtype(k), _curve(f"flops_curve[{k!r}]", v)) for k, v in dict(self.flops_curve).items())))
        object.__setattr__(self, "bandwidth_curve", tuple(sorted((_canonical_dtype(k), _curve(f"bandwidth_curve[{k!r}]", v)) for k, v in dict(self.bandwidth_curve).items())))
        object.__setattr__(self, "collectives", _by_group_size("collectives", self.collectives, _link))
        object.__setattr__(self, "collective_curves", _by_group_size("collective_curves", self.collective_curves, _curve))
        object.__setattr__(self, "sources", tuple(sorted((str(k), str(v)) for k, v in dict(self.sources).items())))
        for field in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, field), Link):
                raise ValueError(f"DeviceProfile.{field} must be a Link, got {getattr(self, field)!r}")

    def flops_per_s(self, dtype_name: str) -> float:
        """Peak FLOP/s for a dtype ("bfloat16", "torch.float16", "bf16", ...).

        Falls back to the "float32" entry when the dtype is not in the profile.
        """
        table = dict(self.peak_flops)
        return table.get(_canonical_dtype(dtype_name), table["float32"])

    def flops_at(self, dtype_name: str, flops: float, kind: str = "matmul", size: float | None = None) -> float:
        """FLOP/s of an op of `flops` FLOPs: the measured curve for its kind
        and dtype, else the matmul curve, else the peak. Matmul and
        convolution curves ("convolution", "convolution_backward") are by
        FLOPs; "attention" curves by `size`, the head dimension (what sets a
        fused attention kernel's efficiency)."""
        if not self.flops_curve:
            return self.flops_per_s(dtype_name)
        curves, dtype = dict(self.flops_curve), _canonical_dtype(dtype_name)
        if kind.startswith("attention") and f"{kind}/{dtype}" in curves and size is not None:
            return _interpolate(curves[f"{kind}/{dtype}"], size)
        if kind.startswith("convolution") and f"{kind}/{dtype}" in curves:
            return _interpolate(curves[f"{kind}/{dtype}"], flops)
        curve = curves.get(dtype)
        return _interpolate(curve, flops) if curve else self.flops_per_s(dtype_name)

    def rows_at(self, dtype_name: str, kind: str, size: float) -> float | None:
        """Query rows per second a fused attention kernel spends apart from its
        FLOPs ("attention_rows/<dtype>", "attention_backward_rows/<dtype>", by
        head dimension: CPU kernels' per-row work, which FLOP/s measured at one
        sequence length miss at another), or None where not measured."""
        curve = dict(self.flops_curve).get(f"{kind}_rows/{_canonical_dtype(dtype_name)}")
        return _interpolate(curve, size) if curve else None

    def bandwidth_at(self, nbytes: float, dtype_name: str = "float32", kind: str = "") -> float:
        """Memory bandwidth for an op moving `nbytes` of a dtype: the measured
        curve for its kind ("transcendental": ops costing many instructions
        per element; "cast": a cast into the dtype) and dtype, else the
        dtype's, else float32's, else the peak."""
        if not self.bandwidth_curve:
            return self.memory_bandwidth
        curves, dtype = dict(self.bandwidth_curve), _canonical_dtype(dtype_name)
        curve = curves.get(f"{kind}/{dtype}") or curves.get(dtype) or curves.get("float32")
        return _interpolate(curve, nbytes) if curve else self.memory_bandwidth

    def collective_link(self, kind: str, p: int, link: Link) -> Link:
        """The link a collective of `kind` over `p` ranks runs at: measured for
        this group size where the axis is inside a node, else `link`."""
        if link is self.intra_node:
            measured = dict(dict(self.collectives).get(p, ()))
            return measured.get(kind, link)
        return link

    def collective_seconds(self, kind: str, nbytes: float, p: int, link: Link) -> float:
        """Seconds of a collective of `kind` on `nbytes` over `p` ranks on
        `link`: the measured curve for this group size where the axis is
        inside a node, else the ring model on the (measured) link."""
        curve = dict(dict(self.collective_curves).get(p, ())).get(kind) if link is self.intra_node else None
        if not curve or p == 1 or nbytes == 0:
            return collective_time(kind, nbytes, p, self.collective_link(kind, p, link))
        if nbytes > curve[-1][0]:
            return curve[-1][1] * nbytes / curve[-1][0]
        return _interpolate(curve, nbytes)

    def axis_links(self, mesh_shape: tuple[int, ...]) -> tuple[Link, ...]:
        """The link each mesh axis communicates over.

        Ranks are laid out row-major over the mesh (last axis fastest) and filled
        node by node. An axis group of axis i lives inside a block of
        P = prod(mesh_shape[i:]) consecutive ranks, so it stays inside one node
        exactly when the axis has size 1, the whole mesh fits in one node, or P
        divides devices_per_node; otherwise some group crosses nodes and the
        axis gets the inter-node link.
        """
        shape = tuple(mesh_shape)
        if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
            raise ValueError(f"mesh_shape must be a non-empty tuple of ints >= 1, got {mesh_shape!r}")
        world = math.prod(shape)
        return tuple(
            self.intra_node if self._axis_is_intra(shape, i, world) else self.inter_node
            for i in range(len(shape))
        )

    def _axis_is_intra(self, shape: tuple[int, ...], axis: int, world: int) -> bool:
        block = math.prod(shape[axis:])
        return shape[axis] == 1 or world <= self.devices_per_node or self.devices_per_node % block == 0

    def to_json(self) -> dict[str, Any]:
        """Return the profile as a JSON-serialisable dict (the profile file format)."""
        return {
            "name": self.name,
            "description": self.description,
            "peak_flops": dict(self.peak_flops),
            "memory_bandwidth": self.memory_bandwidth,
            "memory_capacity": self.memory_capacity,
            "devices_per_node": self.devices_per_node,
            "intra_node": self.intra_node.to_json(),
            "inter_node": self.inter_node.to_json(),
            **({"overlap_slowdown": self.overlap_slowdown} if self.overlap_slowdown else {}),
            **({"op_launch_s": self.op_launch_s} if self.op_launch_s else {}),
            **({"rank_skew": self.rank_skew} if self.rank_skew else {}),
            **({"flops_curve": {k: [list(pt) for pt in v] for k, v in self.flops_curve}} if self.flops_curve else {}),
            **({"bandwidth_curve": {k: [list(pt) for pt in v] for k, v in self.bandwidth_curve}} if self.bandwidth_curve else {}),
            **({"collectives": {str(p): {k: l.to_json() for k, l in links} for p, links in self.collectives}} if self.collectives else {}),
            **(
                {"collective_curves": {str(p): {k: [list(pt) for pt in c] for k, c in curves} for p, curves in self.collective_curves}}
                if self.collective_curves
                else {}
            ),
            **({"sources": dict(self.sources)} if self.sources else {}),
            **({"dispatch_serial": True} if self.dispatch_serial else {}),
        }

    @classmethod
    def from_json(cls, d: Any) -> DeviceProfile:
        """Build a profile from a dict in the profile file format (ValueError names the bad key)."""
        if not isinstance(d, dict):
            raise ValueError(f"profile must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _PROFILE_KEYS if k not in d]
        if missing:
            raise ValueError(f"profile is missing key(s) {missing}; required keys {list(_PROFILE_KEYS)}")
        unknown = sorted(set(d) - set(_PROFILE_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise ValueError(f"profile has unknown key(s) {unknown}; allowed keys {list(_PROFILE_KEYS + _OPTIONAL_KEYS)}")
        if not isinstance(d["peak_flops"], dict):
            raise ValueError(f"profile key 'peak_flops' must be an object, got {d['peak_flops']!r}")
        return cls(
            name=d["name"],
            description=d["description"],
            peak_flops=d["peak_flops"],
            memory_bandwidth=d["memory_bandwidth"],
            memory_capacity=d["memory_capacity"],
            devices_per_node=d["devices_per_node"],
            intra_node=_link_from_json("intra_node", d["intra_node"]),
            inter_node=_link_from_json("inter_node", d["inter_node"]),
            **{k: d[k] for k in ("overlap_slowdown", "rank_skew", "op_launch_s") if k in d},
            dispatch_serial=_flag("dispatch_serial", d.get("dispatch_serial", False)),
            flops_curve=_mapping_of(d, "flops_curve"),
            bandwidth_curve=_mapping_of(d, "bandwidth_curve"),
            collectives={
                _int_key("collectives", p): {k: _link_from_json(f"collectives.{p}.{k}", v) for k, v in _mapping_of(d["collectives"], p).items()}
                for p in _mapping_of(d, "collectives")
            },
            collective_curves={_int_key("collective_curves", p): _mapping_of(d["collective_curves"], p) for p in _mapping_of(d, "collective_curves")},
            sources=_mapping_of(d, "sources"),
        )


_PROFILE_KEYS = (
    "name",
    "description",
    "peak_flops",
    "memory_bandwidth",
    "memory_capacity",
    "devices_per_node",
    "intra_node",
    "inter_node",
)
_OPTIONAL_KEYS = (
    "overlap_slowdown", "rank_skew", "op_launch_s", "flops_curve", "bandwidth_curve", "collectives", "collective_curves", "sources", "dispatch_serial",
)


def _flag(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"profile key {key!r} must be true or false, got {v!r}")
    return v


def _mapping_of(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ValueError(f"profile key {key!r} must be an object, got {v!r}")
    return v


def _int_key(key: str, p: str) -> int:
    if not str(p).isdigit() or int(p) < 2:
        raise ValueError(f"profile key {key!r} is keyed by group size (an int >= 2), got {p!r}")
    return int(p)


def _curve(what: str, points: Any) -> tuple[tuple[float, float], ...]:
    try:
        pts = tuple(sorted((float(a), float(b)) for a, b in points))
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of [size, rate] pairs, got {points!r}") from None
    for a, b in pts:
        _require_number(f"{what} size", a, positive=True)
        _require_number(f"{what} rate", b, positive=True)
    return pts


def _by_group_size(what: str, value: Any, item) -> tuple:
    """{group size: {collective kind: x}} as sorted tuples, each x through `item(where, x)`."""
    out = []
    for p, per_kind in dict(value).items():
        per_kind = dict(per_kind)
        for kind in per_kind:
            _check_kind(kind)
        out.append((int(p), tuple(sorted((k, item(f"{what}[{p}][{k!r}]", x)) for k, x in per_kind.items()))))
    return tuple(sorted(out))


def _link(where: str, link: Any) -> Link:
    if not isinstance(link, Link):
        raise ValueError(f"{where} must be a Link, got {link!r}")
    return link


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise linear in log-log through sorted (size, rate) points, clamped."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return points[-1][1]


def _link_from_json(key: str, d: Any) -> Link:
    if not isinstance(d, dict) or set(d) != {"bandwidth", "latency"}:
        raise ValueError(
            f"profile key {key!r} must be an object with exactly 'bandwidth' and 'latency', got {d!r}"
        )
    try:
        return Link(bandwidth=d["bandwidth"], latency=d["latency"])
    except ValueError as exc:
        raise ValueError(f"profile key {key!r}: {exc}") from None


def _canonical_dtype(dtype_name: str) -> str:
    name = str(dtype_name).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def _normalise_flops(flops: Any) -> tuple[tuple[str, float], ...]:
    items = flops.items() if isinstance(flops, Mapping) else flops
    try:
        pairs = tuple((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"peak_flops must map dtype name -> FLOP/s, got {flops!r}"
        ) from None
    for dtype, value in pairs:
        _require_number(f"peak_flops[{dtype!r}]", value, positive=True)
    if "float32" not in dict(pairs):
        raise ValueError(
            f"peak_flops must include 'float32' (the fallback dtype); got dtypes {sorted(dict(pairs))}"
        )
    return tuple(sorted((k, float(v)) for k, v in pairs))


def _require_number(what: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")


def _require_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


def available_profiles() -> tuple[str, ...]:
    """Names of the profiles shipped in planner/cost/profiles/ (sorted)."""
    return tuple(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load a shipped profile by name ("h100", "a100", "cpu") or a JSON file by path.

    Anything ending in ".json" or containing a path separator is a path.
    """
    text = os.fspath(name_or_path)
    if text.endswith(".json") or "/" in text or os.sep in text:
        return _load_profile_file(Path(text))
    path = PROFILES_DIR / f"{text}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown device profile {text!r}; available profiles: {', '.join(available_profiles())} "
            "(or give a path to a .json profile file)"
        )
    return _load_profile_file(path)


def _load_profile_file(path: Path) -> DeviceProfile:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read device profile file {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"device profile file {str(path)!r} is not valid JSON: {exc}") from None
    try:
        return DeviceProfile.from_json(data)
    except ValueError as exc:
        raise ValueError(f"device profile file {str(path)!r}: {exc}") from None


def _check_collective_args(n: float, p: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"collective byte count must be a finite number >= 0, got {n!r}")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"collective group size must be an int >= 1, got {p!r}")


def _ring_time(n: float, p: int, link: Link, steps_factor: int) -> float:
    _check_collective_args(n, p)
    if p == 1 or n == 0:
        return 0.0
    steps = steps_factor * (p - 1)
    return steps * link.latency + steps / p * n / link.bandwidth


def all_reduce_time(n: float, p: int, link: Link) -> float:
    """Ring all-reduce of an n-byte buffer: 2(p-1)α + 2(p-1)/p · n/B."""
    return _ring_time(n, p, link, 2)


def all_gather_time(n: float, p: int, link: Link) -> float:
    """All-gather producing n output bytes per rank: (p-1)α + (p-1)/p · n/B."""
    return _ring_time(n, p, link, 1)


def reduce_scatter_time(n: float, p: int, link: Link) -> float:
    """Reduce-scatter of n input bytes per rank: (p-1)α + (p-1)/p · n/B."""
    return _ring_time(n, p, link, 1)


def all_to_all_time(n: float, p: int, link: Link) -> float:
    """All-to-all with an n-byte send buffer per rank: (p-1)α + (p-1)/p · n/B."""
    return _ring_time(n, p, link, 1)


_COLLECTIVE_FNS = {
    "all_reduce": all_reduce_time,
    "all_gather": all_gather_time,
    "reduce_scatter": reduce_scatter_time,
    "all_to_all": all_to_all_time,
}


def _check_kind(kind: str) -> None:
    if kind not in _COLLECTIVE_FNS:
        raise ValueError(f"unknown collective kind {kind!r}; required one of {list(COLLECTIVE_KINDS)}")


def collective_time(kind: str, n: float, p: int, link: Link) -> float:
    """Time in seconds of collective `kind` (one of COLLECTIVE_KINDS) on n bytes over p ranks."""
    _check_kind(kind)
    return _COLLECTIVE_FNS[kind](n, p, link)


def bytes_sent_per_rank(kind: str, n: float, p: int) -> float:
    """Bytes each rank sends: 2(p-1)/p·n for all_reduce, (p-1)/p·n for the others."""
    _check_kind(kind)
    _check_collective_args(n, p)
    factor = 2 if kind == "all_reduce" else 1
    return factor * (p - 1) / p * n


def compute_time(
    flops: float, bytes_moved: float, profile: DeviceProfile, dtype_name: str, kind: str = "matmul", size: float | None = None, rows: float = 0.0
) -> float:
    """Roofline time: max(flops / FLOP/s for dtype, bytes_moved / memory bandwidth),
    the rates at this op's size (and kind: "matmul", "convolution",
    "convolution_backward", "attention" and "attention_backward" with `size`
    its head dimension and `rows` its query rows, "transcendental", "cast")
    where the profile has measured curves, and no less than the profile's floor per op
    (0 in the datasheet profiles)."""
    _require_number("flops", flops, positive=False)
    _require_number("bytes_moved", bytes_moved, positive=False)
    if flops == 0 and bytes_moved == 0:
        return 0.0
    rate = profile.flops_at(dtype_name, flops, kind, size) if flops else 1.0
    work = flops / rate
    if rows and size is not None and (per_s := profile.rows_at(dtype_name, kind, size)):
        work += rows / per_s
    bandwidth = profile.bandwidth_at(bytes_moved, dtype_name, kind) if bytes_moved else 1.0
    return max(profile.op_launch_s, work, bytes_moved / bandwidth)


def to_ns(seconds: float) -> int:
    """Seconds -> integer nanoseconds (rounded, clamped at 0) for the integer program."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a finite number, got {seconds!r}")
    return max(0, round(seconds * SECONDS_TO_NS))
