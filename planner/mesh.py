"""Device mesh description, mesh/size parsing and human-readable formatting."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, ROUND_HALF_EVEN
from typing import Any

__all__ = [
    "MeshError",
    "MeshSpec",
    "parse_mesh",
    "parse_size",
    "format_bytes",
    "format_seconds",
]

_MESH_FORMS = "accepted forms: '8', '2x4', '4x4x4', 'dp=2,tp=4'"
_INT_RE = re.compile(r"[+-]?\d+")


class MeshError(ValueError):
    """A mesh description or MeshSpec is invalid."""


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """Logical device mesh: axis sizes and axis names, ranks laid out row-major."""

    shape: tuple[int, ...]
    axis_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "axis_names", tuple(self.axis_names))
        _validate_shape(self.shape)
        _validate_names(self.axis_names, len(self.shape))

    @property
    def ndim(self) -> int:
        """Number of mesh axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Total number of devices (product of the axis sizes)."""
        return math.prod(self.shape)

    def axis_index(self, name_or_index: str | int) -> int:
        """Return the index of a mesh axis given its name or its index."""
        if isinstance(name_or_index, bool):
            raise MeshError(f"mesh axis must be a name or an int index, got {name_or_index!r}")
        if isinstance(name_or_index, int):
            if 0 <= name_or_index < self.ndim:
                return name_or_index
            raise MeshError(
                f"mesh axis index {name_or_index} is out of range for mesh {self}; "
                f"required 0 <= index < {self.ndim}"
            )
        if isinstance(name_or_index, str):
            if name_or_index in self.axis_names:
                return self.axis_names.index(name_or_index)
            raise MeshError(
                f"unknown mesh axis {name_or_index!r} for mesh {self}; "
                f"axis names are {list(self.axis_names)}"
            )
        raise MeshError(
            f"mesh axis must be a name or an int index, got {type(name_or_index).__name__} "
            f"{name_or_index!r}"
        )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict {"shape": [...], "axis_names": [...]}."""
        return {"shape": list(self.shape), "axis_names": list(self.axis_names)}

    @classmethod
    def from_json(cls, d: Any) -> MeshSpec:
        """Build a MeshSpec from the dict produced by `to_json`."""
        if not isinstance(d, dict):
            raise MeshError(f"mesh JSON must be an object, got {type(d).__name__}")
        missing = [k for k in ("shape", "axis_names") if k not in d]
        if missing:
            raise MeshError(f"mesh JSON is missing key(s) {missing}; got keys {sorted(d)}")
        for key in ("shape", "axis_names"):
            if not isinstance(d[key], (list, tuple)):
                raise MeshError(f"mesh JSON key {key!r} must be a list, got {d[key]!r}")
        return cls(shape=tuple(d["shape"]), axis_names=tuple(d["axis_names"]))

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in zip(self.axis_names, self.shape))


def _validate_shape(shape: tuple[Any, ...]) -> None:
    if not shape:
        raise MeshError("mesh shape is empty; a mesh needs at least one axis")
    for i, size in enumerate(shape):
        if not isinstance(size, int) or isinstance(size, bool):
            raise MeshError(f"mesh axis {i} size must be an int, got {size!r}")
        if size < 1:
            raise MeshError(f"mesh axis {i} has size {size}; every axis needs size >= 1")


def _validate_names(names: tuple[Any, ...], ndim: int) -> None:
    if len(names) != ndim:
        raise MeshError(
            f"mesh has {ndim} axes but {len(names)} axis names {list(names)}; "
            "required one name per axis"
        )
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.isidentifier():
            raise MeshError(
                f"mesh axis {i} name {name!r} is invalid; required a non-empty identifier"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MeshError(f"duplicate mesh axis name(s) {dupes} in {list(names)}; names must be unique")


def parse_mesh(text: str) -> MeshSpec:
    """Parse "8", "2x4", "4x4x4" or "dp=2,tp=4" into a MeshSpec.

    Unnamed axes (separated by "x"; "," also works) get default names d0, d1, ...;
    whitespace is ignored. Raises MeshError on anything else.
    """
    if not isinstance(text, str):
        raise MeshError(f"mesh must be a string, got {type(text).__name__} {text!r}; {_MESH_FORMS}")
    compact = "".join(text.split())
    if not compact:
        raise _mesh_error(text, "it is empty")
    if "=" in compact:
        names, sizes = _parse_named(text, compact)
    else:
        sizes = _parse_sizes(text, re.split(r"[xX,]", compact))
        names = tuple(f"d{i}" for i in range(len(sizes)))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _mesh_error(text, f"duplicate axis name(s) {dupes}")
    try:
        return MeshSpec(shape=sizes, axis_names=names)
    except MeshError as exc:
        raise _mesh_error(text, str(exc)) from None


def _parse_named(text: str, compact: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names: list[str] = []
    raw_sizes: list[str] = []
    for part in compact.split(","):
        if not part:
            raise _mesh_error(text, "it has an empty axis between commas")
        name, eq, size = part.partition("=")
        if not eq or re.search(r"[xX]", size) or "=" in size:
            raise _mesh_error(
                text, f"it mixes named and unnamed axes at {part!r}; name every axis or none"
            )
        if not name.isidentifier():
            raise _mesh_error(text, f"axis name {name!r} is not a non-empty identifier")
        names.append(name)
        raw_sizes.append(size)
    return tuple(names), _parse_sizes(text, raw_sizes)


def _parse_sizes(text: str, raw: list[str]) -> tuple[int, ...]:
    sizes: list[int] = []
    for i, token in enumerate(raw):
        if not _INT_RE.fullmatch(token):
            raise _mesh_error(text, f"mesh axis {i} size {token!r} is not an integer")
        size = int(token)
        if size < 1:
            raise _mesh_error(text, f"mesh axis {i} has size {size}; every axis needs size >= 1")
        sizes.append(size)
    return tuple(sizes)


def _mesh_error(text: str, reason: str) -> MeshError:
    return MeshError(f"invalid mesh {text!r}: {reason}; {_MESH_FORMS}")


_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)\s*")
_SIZE_FORMS = "accepted: an integer byte count or a number with unit B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '16MiB', '1.5 GB')"


def parse_size(text: str | int) -> int:
    """Parse a byte size such as "1024", "16MiB", "1.5 GB" or "80GiB" into bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; the unit is
    case-insensitive. Fractional byte counts are rounded to the nearest byte.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size {text!r} is not positive; required a size > 0 bytes")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size must be a string or int, got {type(text).__name__} {text!r}; {_SIZE_FORMS}")
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}; {_SIZE_FORMS}")
    try:
        value = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"invalid size {text!r}; {_SIZE_FORMS}") from None
    nbytes = int(value.to_integral_value(rounding=ROUND_HALF_EVEN))
    if nbytes <= 0:
        raise ValueError(f"size {text!r} is {value} bytes; required a size of at least 1 byte")
    return nbytes


def _three_sig(value: float) -> str:
    """Format a non-negative value < 1000 with three significant digits."""
    if value < 9.995:
        return f"{value:.2f}"
    if value < 99.95:
        return f"{value:.1f}"
    return f"{value:.0f}"


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int | float) -> str:
    """Human-readable byte count with binary units and three significant digits.

    Examples: 512 -> "512 B", 32768 -> "32.0 KiB", 1.5 * 2**30 -> "1.50 GiB".
    """
    _require_finite("byte count", n)
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        whole = value == int(value)
        return f"{sign}{int(value)} B" if whole else f"{sign}{_three_sig(value)} B"
    unit = 0
    while value >= 1023.5 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{sign}{_three_sig(value)} {_BYTE_UNITS[unit]}"


_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def format_seconds(s: int | float) -> str:
    """Human-readable duration with three significant digits.

    Examples: 1.23e-5 -> "12.3 us", 4.56e-3 -> "4.56 ms", 1.234 -> "1.23 s", 0 -> "0 s".
    """
    _require_finite("duration", s)
    if s == 0:
        return "0 s"
    sign = "-" if s < 0 else ""
    value = abs(float(s))
    for name, scale in _TIME_UNITS:
        if value >= scale * 0.9995 or name == "ns":
            return f"{sign}{_three_sig(value / scale)} {name}"
    raise AssertionError("unreachable")


def _require_finite(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
