"""What layers and steps promise to communicate: structured records, no HLO parsing.

A layer (or a training step) lists the collectives it should compile to as
`Declared` records; `shardlax.audit` reads the compiled program and holds one
against the other. This module imports nothing of the rest of shardlax, so
`nn/` can declare without importing the audit.

Each record says *what* moves (kind, mesh axes, HLO dtype, bytes per device)
and, as structured fields, *what it is for*: its `role` (an activation, a
parameter gather, a gradient reduction, the loss...), the `phase`
(forward/backward), the `module` that owns it and the `param` it moves (for
parameter and gradient collectives), and a short `tag` naming the tensor
inside the module (`"x"`, `"y"`, `"dx"`, `"dy"`...). Filter on those
(`select`, `drop`); `why` is free text for display and never a key.

Byte conventions, per device, with S the larger of the operand and result
buffers (the "size" of nccl-tests) and n the group size (`wire_bytes`):

| kind               | bytes sent per device                  |
| ------------------ | -------------------------------------- |
| all-reduce         | 2 S (n-1)/n  (ring)                    |
| all-gather         | S (n-1)/n    (S = gathered result)     |
| reduce-scatter     | S (n-1)/n    (S = unscattered operand) |
| all-to-all         | S (n-1)/n                              |
| collective-permute | S                                      |
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

#: Bytes per element of each HLO element type.
DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


class Role(enum.StrEnum):
    """What a declared collective is for."""

    #: a forward activation: the sum of partial products, a gather of x, a scatter of y
    ACTIVATION = "activation"
    #: the backward of an activation collective (dx, dy)
    ACTIVATION_GRAD = "activation-grad"
    #: an FSDP gather of a parameter for compute (forward, or once for the whole step)
    PARAM_GATHER = "param-gather"
    #: the backward's second gather of a parameter (reshard_after_forward, remat)
    PARAM_REGATHER = "param-regather"
    #: a parameter gradient's reduction (reduce-scatter over fsdp, all-reduce over data)
    GRAD_REDUCE = "grad-reduce"
    #: an optimizer-side collective (ZeRO's parameter all-gather after the update)
    PARAM_UPDATE = "param-update"
    #: the loss (its global mean, the vocabulary-parallel softmax statistics)
    LOSS = "loss"
    #: the global gradient norm (clipping)
    NORM = "norm"
    OTHER = "other"


class Phase(enum.StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    UPDATE = "update"
    ANY = "any"


@dataclasses.dataclass(frozen=True)
class Declared:
    """A collective a layer or step promises to compile to.

    `bytes` is per device, in the convention of `audit.Collective.bytes`,
    summed over the `count` instances; `None` means "not declared". The
    keyword-only fields say what the collective is for; `why` is display text.
    """

    kind: str
    axes: tuple[str, ...]
    dtype: str
    count: int = 1
    bytes: int | None = None
    why: str = ""
    role: Role = dataclasses.field(default=Role.OTHER, kw_only=True)
    phase: Phase = dataclasses.field(default=Phase.ANY, kw_only=True)
    module: str = dataclasses.field(default="", kw_only=True)
    param: str = dataclasses.field(default="", kw_only=True)
    tag: str = dataclasses.field(default="", kw_only=True)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Declared(kind={self.kind!r}): expected one of {KINDS}.")
        if not isinstance(self.role, Role):
            raise TypeError(
                f"Declared(role={self.role!r}): expected a shardlax.declarations.Role, "
                f"e.g. Role.ACTIVATION."
            )
        if not isinstance(self.phase, Phase):
            raise TypeError(
                f"Declared(phase={self.phase!r}): expected a shardlax.declarations.Phase, "
                f"e.g. Phase.FORWARD."
            )
        object.__setattr__(self, "axes", tuple(sorted(self.axes)))

    @property
    def key(self) -> tuple[Role, Phase, str, str, str]:
        """(role, phase, module, param, tag): what the collective is for, as data."""
        return (self.role, self.phase, self.module, self.param, self.tag)

    def matches(self, **fields: Any) -> bool:
        """True when every given field equals this record's (e.g. `role=Role.LOSS`)."""
        bad = set(fields) - {f.name for f in dataclasses.fields(self)}
        if bad:
            raise TypeError(
                f"Declared.matches({', '.join(sorted(bad))}=...): not a field of Declared; "
                f"use one of kind, axes, dtype, role, phase, module, param, tag."
            )
        return all(getattr(self, k) == v for k, v in fields.items())


def select(declared: Iterable[Declared], **fields: Any) -> list[Declared]:
    """The records whose fields equal `fields` (e.g. `select(d, role=Role.GRAD_REDUCE)`)."""
    return [d for d in declared if d.matches(**fields)]


def drop(declared: Iterable[Declared], *keys: dict[str, Any]) -> list[Declared]:
    """The records matching none of `keys` (each a dict of fields, as for `select`)."""
    return [d for d in declared if not any(d.matches(**k) for k in keys)]


def hlo_dtype(dtype: Any) -> str:
    """The HLO name of a dtype, as the compiled program spells it: f32, bf16, s32, u16, pred."""
    name = jnp.dtype(dtype).name
    if name == "bool":
        return "pred"
    if name == "bfloat16":
        return "bf16"
    for prefix, short in (("uint", "u"), ("int", "s"), ("float", "f"), ("complex", "c")):
        if name.startswith(prefix):
            return short + name[len(prefix) :].replace("_", "")
    return name


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of `shape` and `dtype`."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize


def wire_bytes(kind: str, size: float, group_size: int) -> float:
    """Bytes each device sends for a collective of S = `size` bytes over `group_size` devices.

    Bandwidth-optimal ring algorithms (the table of the module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"wire_bytes(kind={kind!r}): expected one of {KINDS}.")
    n = group_size
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * size * (n - 1) / n
    if kind == "collective-permute":
        return float(size)
    return size * (n - 1) / n
