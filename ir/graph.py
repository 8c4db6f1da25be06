"""The dtplan IR: frozen nodes lifted once from an ATen-level fx graph.

Downstream stages (planner, report) read only these values; the fx graph is
kept beside the IR solely for the runtime, which executes it.
"""
from __future__ import annotations

import enum
import operator
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Graph", "Node", "Ref", "Role", "TensorMeta", "dtype_name", "to_ref"]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> "float32"."""
    return str(dtype).removeprefix("torch.")



def base_name(name: str) -> str:
    """The name tracing asked for ("mm" for "mm_12"): fx makes names unique
    with a numeric suffix, and a rebuilt graph asks again for the base."""
    return re.sub(r"_\d+$", "", name)

@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Global shape, stride and dtype of one tensor value."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()), t.dtype)


class Role(enum.Enum):
    PARAM = "param"
    BUFFER = "buffer"
    CONSTANT = "constant"
    INPUT = "input"
    ACTIVATION = "activation"


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to another node's value inside `Node.args`."""

    name: str


@dataclass(frozen=True, slots=True)
class Node:
    """One value-producing step of the program.

    `target` is an ATen OpOverload for op nodes, `operator.getitem` for tuple
    projections and None for placeholders. `args`/`kwargs` hold the call's
    arguments with node references replaced by `Ref`, as tuples.
    """

    name: str
    target: object
    args: tuple
    kwargs: tuple[tuple[str, object], ...]
    meta: TensorMeta | tuple[TensorMeta | None, ...] | None
    role: Role
    fqn: str | None = None
    module: str = ""
    flops: int = 0
    bytes: int = 0

    @property
    def is_placeholder(self) -> bool:
        return self.target is None

    @property
    def is_getitem(self) -> bool:
        return self.target is operator.getitem

    @property
    def op_name(self) -> str:
        if self.target is None:
            return "placeholder"
        if self.is_getitem:
            return "getitem"
        return str(self.target)

    @property
    def tensor_meta(self) -> TensorMeta | None:
        return self.meta if isinstance(self.meta, TensorMeta) else None

    def refs(self) -> tuple[str, ...]:
        """Names of the nodes this node reads, in argument order, repeats kept."""
        out: list[str] = []
        _collect_refs((self.args, tuple(v for _, v in self.kwargs)), out)
        return tuple(out)


def _collect_refs(value: object, out: list[str]) -> None:
    if isinstance(value, Ref):
        out.append(value.name)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _collect_refs(v, out)


@dataclass(frozen=True)
class Graph:
    """A topologically ordered program: nodes plus the names of its outputs."""

    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for n in self.nodes:
            missing = [r for r in n.refs() if r not in seen]
            if missing:
                raise ValueError(f"IR node {n.name!r} reads {missing} before they are defined")
            seen.add(n.name)
        for o in self.outputs:
            if o not in seen:
                raise ValueError(f"IR output {o!r} is not a node")

    @cached_property
    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def last_use(self) -> dict[str, int]:
        """Index of the last node reading each value (outputs live to the end)."""
        index = {n.name: i for i, n in enumerate(self.nodes)}
        last = {n.name: index[n.name] for n in self.nodes}
        for n in self.nodes:
            for r in n.refs():
                last[r] = max(last[r], index[n.name])
        for o in self.outputs:
            last[o] = len(self.nodes)
        return last

    @cached_property
    def signature(self) -> str:
        """A stable digest of ops, shapes and names: a plan is only valid for this graph."""
        import hashlib

        h = hashlib.sha256()
        for n in self.nodes:
            h.update(f"{n.name}|{n.op_name}|{n.fqn}|{_meta_str(n.meta)}|{n.refs()}\n".encode())
        h.update(repr(self.outputs).encode())
        return h.hexdigest()[:16]


def _meta_str(meta: object) -> str:
    if isinstance(meta, TensorMeta):
        return f"{list(meta.shape)}:{dtype_name(meta.dtype)}"
    if isinstance(meta, tuple):
        return ",".join(_meta_str(m) for m in meta)
    return "-"


def to_ref(value):
    """An fx argument with each fx.Node as a `Ref` to it (lists as tuples)."""
    if isinstance(value, torch.fx.Node):
        return Ref(value.name)
    if isinstance(value, (list, tuple)):
        return tuple(to_ref(v) for v in value)
    return value
