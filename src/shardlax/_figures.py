"""Per-device figures of one compiled program: memory, collectives, wire bytes.

Shared by `shardlax.plan` (abstract scale-out studies) and `shardlax.budget`
(the memory-budget planner). Imports nothing of JAX at module level:
`python -m shardlax.plan` asks for its simulated devices before JAX starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Figures:
    """Per-device figures of one compiled step (bytes; collectives per step, loops per trip)."""

    arguments: int
    outputs: int
    temp: int
    alias: int
    wire_bytes: float  # bytes each device sends per step (`Report.executed_wire_bytes`)
    kinds: dict[str, int]  # tensors moved per step, by collective kind
    compile_s: float = dataclasses.field(default=0.0, compare=False)

    @property
    def collectives(self) -> int:
        """Tensors moved per step, every kind."""
        return sum(self.kinds.values())

    @property
    def all_gathers(self) -> int:
        """All-gathered tensors per step."""
        return self.kinds.get("all-gather", 0)

    @property
    def peak(self) -> int:
        """arguments + outputs + temp - aliased (donated) bytes (`audit.Memory.peak_estimate`)."""
        return self.arguments + self.outputs + self.temp - self.alias

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "collectives": self.collectives}


def figures_of(compiled: Any, *, mesh: Any = None, compile_s: float = 0.0) -> Figures:
    """The figures of a `jax.stages.Compiled` (from its memory analysis and its HLO)."""
    from shardlax import audit

    mem = audit.memory(compiled)
    report = audit.collectives(compiled, mesh=mesh)
    kinds: dict[str, int] = {}
    for c in report:
        kinds[c.kind] = kinds.get(c.kind, 0) + c.operands * c.trips
    return Figures(
        arguments=mem.arguments, outputs=mem.outputs, temp=mem.temp, alias=mem.alias,
        wire_bytes=float(report.executed_wire_bytes()), kinds=kinds, compile_s=compile_s,
    )  # fmt: skip
