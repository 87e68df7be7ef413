"""Read the collectives of a compiled program.

`collectives(fn, *args)` compiles `fn` for `args` and lists every collective
of the **compiled** HLO (after XLA has merged, moved or removed some), each
with its kind, the mesh axes its replica groups span, its dtype and its bytes
per device. Layers declare the collectives they should compile to
(`Declared`), and `compare` holds one against the other.

Byte conventions, per device, with S the larger of the operand and result
buffers (the "size" of nccl-tests) and n the group size:

| kind               | bytes sent per device (``wire_bytes``) |
| ------------------ | -------------------------------------- |
| all-reduce         | 2 S (n-1)/n  (ring)                    |
| all-gather         | S (n-1)/n    (S = gathered result)     |
| reduce-scatter     | S (n-1)/n    (S = unscattered operand) |
| all-to-all         | S (n-1)/n                              |
| collective-permute | S                                      |

A collective inside a loop body (`lax.scan`, `fori_loop`) appears once in
the HLO; `in_loop` marks it, and `trips` says how many times it runs per call
(the product of the enclosing loops' known trip counts; 1 outside loops), so
`Report.executed_bytes()` is what one call really moves.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from shardlax._hlo import Collective as Collective
from shardlax._hlo import Report as Report
from shardlax._hlo import parse_hlo as parse_hlo
from shardlax.declarations import KINDS as KINDS
from shardlax.declarations import Declared as Declared
from shardlax.declarations import Phase as Phase
from shardlax.declarations import Role as Role
from shardlax.declarations import drop as drop
from shardlax.declarations import hlo_dtype as hlo_dtype
from shardlax.declarations import nbytes as nbytes
from shardlax.declarations import select as select
from shardlax.declarations import wire_bytes as wire_bytes


def _find_mesh(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree):
        sharding = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def _stage(fn: Any) -> jax.stages.Lowered | jax.stages.Compiled | None:
    """The `jax.stages` object of a lowered/compiled program (nnx.jit's wrap one), else None."""
    if isinstance(fn, (jax.stages.Compiled, jax.stages.Lowered)):
        return fn
    for attr in ("compiled", "lowered"):  # flax.nnx's Compiled / Lowered stages
        inner = getattr(fn, attr, None)
        if isinstance(inner, (jax.stages.Compiled, jax.stages.Lowered)):
            return inner
    return None


def compile_fn(fn: Callable | jax.stages.Lowered | jax.stages.Compiled, *args, **kwargs):
    """`fn` (jitted or not) lowered and compiled for `args`; a `Lowered` compiled; a
    `Compiled` as it is (neither takes arguments: they already have theirs). The
    stages of `nnx.jit` are accepted too."""
    stage = _stage(fn)
    if stage is not None:
        if args or kwargs:
            kind = type(stage).__name__
            raise TypeError(
                f"audit: got a jax.stages.{kind} and {len(args) + len(kwargs)} argument(s); a "
                f"{kind} already holds its arguments' shapes. Pass the {kind} alone "
                f"(audit.collectives(compiled)), or the function with its arguments "
                f"(audit.collectives(step, state, batch))."
            )
        return stage.compile() if isinstance(stage, jax.stages.Lowered) else stage
    if not hasattr(fn, "lower"):
        fn = jax.jit(fn)
    return fn.lower(*args, **kwargs).compile()


def collectives(
    fn: Callable | jax.stages.Lowered | jax.stages.Compiled,
    *args,
    mesh: Mesh | None = None,
    **kwargs,
) -> Report:
    """The collectives of the compiled HLO of `fn(*args, **kwargs)`.

    Args:
      fn: a function, jitted or not (an `nnx.jit` function works too), or an
        already lowered (`jax.stages.Lowered`) or compiled
        (`jax.stages.Compiled`) program, which is read as it is (pass no
        arguments with those).
      *args: example arguments (arrays or `jax.ShapeDtypeStruct`s with shardings).
      mesh: the mesh whose axes name the replica groups; default: the mesh of
        the first argument with a `NamedSharding`, else the one set with
        `jax.set_mesh`, else the mesh of the program's input shardings.
      **kwargs: keyword arguments of `fn`.

    Returns:
      A `Report`: a list of `Collective`, in program order.

    Example:
      >>> mesh = shardlax.make_mesh(data=8)
      >>> w = jax.device_put(jnp.ones((4, 4)), jax.NamedSharding(mesh, jax.P()))
      >>> x = jax.device_put(jnp.ones((16, 4)), jax.NamedSharding(mesh, jax.P("data")))
      >>> grad = jax.grad(lambda w, x: jnp.mean((x @ w) ** 2))
      >>> compiled = jax.jit(grad).lower(w, x).compile()
      >>> [(c.kind, c.axes, c.operand_bytes) for c in collectives(compiled)]
      [('all-reduce', ('data',), 64)]
    """
    if mesh is None:
        mesh = _find_mesh((args, kwargs))
    if mesh is None:
        current = jax.sharding.get_mesh()
        mesh = None if current.empty else current
    compiled = compile_fn(fn, *args, **kwargs)
    if mesh is None:
        mesh = _find_mesh((compiled.input_shardings, compiled.output_shardings))
    return parse_hlo(compiled.as_text(), mesh)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device memory of a compiled program, from `memory_analysis()` (bytes)."""

    arguments: int
    outputs: int
    temp: int
    alias: int

    @property
    def peak_estimate(self) -> int:
        """arguments + outputs + temp - aliased (donated) bytes."""
        return self.arguments + self.outputs + self.temp - self.alias


def memory(fn: Callable | jax.stages.Lowered | jax.stages.Compiled, *args, **kwargs) -> Memory:
    """Per-device memory of `fn` compiled for `args` (or of a `Lowered` / `Compiled`)."""
    stats = compile_fn(fn, *args, **kwargs).memory_analysis()
    return Memory(
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
    )


@dataclasses.dataclass(frozen=True)
class Row:
    kind: str
    axes: tuple[str, ...]
    dtype: str
    declared_count: int
    compiled_count: int
    instructions: int
    declared_bytes: int | None
    compiled_bytes: int

    @property
    def ok(self) -> bool:
        return self.declared_count == self.compiled_count and (
            self.declared_bytes is None or self.declared_bytes == self.compiled_bytes
        )


class Comparison(list):
    """Rows of declared vs compiled collectives, grouped by (kind, axes, dtype).

    Counts are of tensors: XLA's combiners merge several same-kind
    collectives into one HLO instruction with several operands, which moves
    the same bytes; `instructions` shows how many HLO ops they became.
    """

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self)

    def table(self) -> str:
        rows = [
            "| kind | axes | dtype | declared | compiled (HLO ops) | declared bytes "
            "| compiled bytes | ok |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for r in self:
            db = "-" if r.declared_bytes is None else f"{r.declared_bytes:,}"
            rows.append(
                f"| {r.kind} | {','.join(r.axes) or '-'} | {r.dtype} | {r.declared_count} | "
                f"{r.compiled_count} ({r.instructions}) | {db} | {r.compiled_bytes:,} | "
                f"{'yes' if r.ok else 'NO'} |"
            )
        return "\n".join(rows)

    def __str__(self) -> str:  # pragma: no cover - display only
        return self.table()


def compare(declared: Sequence[Declared], report: Sequence[Collective]) -> Comparison:
    """Group declared and compiled collectives by (kind, axes, dtype) and pair them up."""
    dec: dict[tuple, list[Declared]] = collections.defaultdict(list)
    for d in declared:
        dec[(d.kind, d.axes, d.dtype)].append(d)
    got: dict[tuple, list[Collective]] = collections.defaultdict(list)
    for c in report:
        got[(c.kind, c.axes, c.dtype)].append(c)
    rows = Comparison()
    for key in sorted(set(dec) | set(got)):
        ds, cs = dec.get(key, []), got.get(key, [])
        declared_bytes = None
        if ds and all(d.bytes is not None for d in ds):
            declared_bytes = sum(d.bytes for d in ds)
        rows.append(
            Row(
                kind=key[0],
                axes=key[1],
                dtype=key[2],
                declared_count=sum(d.count for d in ds),
                compiled_count=sum(c.operands for c in cs),
                instructions=len(cs),
                declared_bytes=declared_bytes,
                compiled_bytes=sum(c.bytes for c in cs),
            )
        )
    return rows
