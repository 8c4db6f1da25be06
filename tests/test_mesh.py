from __future__ import annotations

import json

import pytest

from dtplan.planner.mesh import MeshError, MeshSpec, format_bytes, format_seconds, parse_mesh, parse_size


@pytest.mark.parametrize(
    ("text", "shape", "names"),
    [
        ("8", (8,), ("d0",)),
        ("2x4", (2, 4), ("d0", "d1")),
        ("4x4x4", (4, 4, 4), ("d0", "d1", "d2")),
        (" 2 x 4 ", (2, 4), ("d0", "d1")),
        ("2X4", (2, 4), ("d0", "d1")),
        ("2,4", (2, 4), ("d0", "d1")),
        ("1", (1,), ("d0",)),
        ("dp=2,tp=4", (2, 4), ("dp", "tp")),
        (" dp = 2 , tp = 4 ", (2, 4), ("dp", "tp")),
        ("x=2,y=2,z=2", (2, 2, 2), ("x", "y", "z")),
    ],
)
def test_parse_mesh_forms(text: str, shape: tuple[int, ...], names: tuple[str, ...]) -> None:
    mesh = parse_mesh(text)
    assert mesh.shape == shape
    assert mesh.axis_names == names


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("2xa", "mesh axis 1 size 'a' is not an integer"),
        ("2.5", "mesh axis 0 size '2.5' is not an integer"),
        ("2x", "mesh axis 1 size '' is not an integer"),
        ("dp=two", "mesh axis 0 size 'two' is not an integer"),
        ("2x0", "mesh axis 1 has size 0; every axis needs size >= 1"),
        ("dp=-2,tp=4", "mesh axis 0 has size -2; every axis needs size >= 1"),
        ("dp=2,4", "mixes named and unnamed axes"),
        ("dp=2x4", "mixes named and unnamed axes"),
        ("dp=2,dp=4", "duplicate axis name(s) ['dp']"),
        ("1dp=2", "axis name '1dp' is not a non-empty identifier"),
        ("=2", "axis name '' is not a non-empty identifier"),
        ("dp=2,,tp=4", "empty axis"),
    ],
)
def test_parse_mesh_errors(text: str, fragment: str) -> None:
    with pytest.raises(MeshError) as info:
        parse_mesh(text)
    msg = str(info.value)
    assert fragment in msg
    assert repr(text) in msg
    assert "'dp=2,tp=4'" in msg and "'2x4'" in msg
    assert "\n" not in msg


def test_mesh_error_is_value_error() -> None:
    assert issubclass(MeshError, ValueError)


def test_mesh_properties_and_str() -> None:
    mesh = parse_mesh("dp=2,tp=4")
    assert mesh.ndim == 2
    assert mesh.size == 8
    assert str(mesh) == "dp=2,tp=4"
    assert str(parse_mesh("4x4x4")) == "d0=4,d1=4,d2=4"
    assert parse_mesh("4x4x4").size == 64


def test_axis_index() -> None:
    mesh = parse_mesh("dp=2,tp=4")
    assert mesh.axis_index("dp") == 0
    assert mesh.axis_index("tp") == 1
    assert mesh.axis_index(1) == 1
    with pytest.raises(MeshError, match=r"unknown mesh axis 'pp'.*\['dp', 'tp'\]"):
        mesh.axis_index("pp")
    with pytest.raises(MeshError, match=r"index 2 is out of range.*0 <= index < 2"):
        mesh.axis_index(2)
    with pytest.raises(MeshError, match="out of range"):
        mesh.axis_index(-1)
    with pytest.raises(MeshError, match="name or an int index"):
        mesh.axis_index(1.0)  # type: ignore[arg-type]
    with pytest.raises(MeshError, match="name or an int index"):
        mesh.axis_index(True)


def test_meshspec_validation() -> None:
    with pytest.raises(MeshError, match=r"2 axes but 1 axis names"):
        MeshSpec(shape=(2, 4), axis_names=("dp",))
    with pytest.raises(MeshError, match="mesh axis 0 has size 0; every axis needs size >= 1"):
        MeshSpec(shape=(0,), axis_names=("dp",))
    with pytest.raises(MeshError, match=r"duplicate mesh axis name\(s\) \['a'\]"):
        MeshSpec(shape=(2, 2), axis_names=("a", "a"))
    with pytest.raises(MeshError, match="non-empty identifier"):
        MeshSpec(shape=(2,), axis_names=("",))
    with pytest.raises(MeshError, match="non-empty identifier"):
        MeshSpec(shape=(2,), axis_names=("a b",))
    with pytest.raises(MeshError, match="must be an int"):
        MeshSpec(shape=(2.0,), axis_names=("a",))  # type: ignore[arg-type]
    with pytest.raises(MeshError, match="at least one axis"):
        MeshSpec(shape=(), axis_names=())


def test_meshspec_is_hashable_and_frozen() -> None:
    mesh = MeshSpec(shape=[2, 4], axis_names=["dp", "tp"])  # type: ignore[arg-type]
    assert mesh.shape == (2, 4) and mesh.axis_names == ("dp", "tp")
    assert hash(mesh) == hash(parse_mesh("dp=2,tp=4"))
    with pytest.raises(AttributeError):
        mesh.shape = (8,)  # type: ignore[misc]


def test_meshspec_json_round_trip() -> None:
    mesh = parse_mesh("dp=2,tp=4")
    d = mesh.to_json()
    assert d == {"shape": [2, 4], "axis_names": ["dp", "tp"]}
    again = MeshSpec.from_json(json.loads(json.dumps(d)))
    assert again == mesh
    with pytest.raises(MeshError, match=r"missing key\(s\) \['axis_names'\]"):
        MeshSpec.from_json({"shape": [2]})
    with pytest.raises(MeshError, match="must be an object"):
        MeshSpec.from_json([2, 4])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("16MiB", 16 * 2**20),
        ("16mib", 16 * 2**20),
        ("80GiB", 80 * 2**30),
        ("80 GiB", 80 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * 2**29),
        ("2KB", 2000),
        ("2kib", 2048),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("10B", 10),
        ("7 b", 7),
        ("  64 MB  ", 64_000_000),
        (".5KiB", 512),
        (4096, 4096),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "invalid size ''"),
        ("abc", "invalid size 'abc'"),
        ("16 MiBs", "invalid size '16 MiBs'"),
        ("16PB", "invalid size '16PB'"),
        ("1e9", "invalid size '1e9'"),
        ("0", "required a size of at least 1 byte"),
        ("0GiB", "required a size of at least 1 byte"),
        ("-5MB", "required a size of at least 1 byte"),
        (0, "is not positive"),
        (1.5, "must be a string or int"),
    ],
)
def test_parse_size_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_parse_size_error_lists_units() -> None:
    with pytest.raises(ValueError, match="KiB, MiB, GiB, TiB"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1.00 KiB"),
        (32768, "32.0 KiB"),
        (16 * 2**20, "16.0 MiB"),
        (1.5 * 2**30, "1.50 GiB"),
        (80 * 2**30, "80.0 GiB"),
        (300 * 2**20, "300 MiB"),
        (2**40, "1.00 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: float, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        (0, "0 s"),
        (12.3e-6, "12.3 us"),
        (4.56e-3, "4.56 ms"),
        (1.234, "1.23 s"),
        (250e-9, "250 ns"),
        (999.99e-6, "1.00 ms"),
        (123.4, "123 s"),
    ],
)
def test_format_seconds(s: float, expected: str) -> None:
    assert format_seconds(s) == expected


def test_format_rejects_non_numbers() -> None:
    with pytest.raises(ValueError, match="must be finite"):
        format_seconds(float("nan"))
    with pytest.raises(ValueError, match="must be a number"):
        format_bytes("12")  # type: ignore[arg-type]
