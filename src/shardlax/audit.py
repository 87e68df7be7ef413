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
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


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


_ARRAY_TYPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$")
_CALLED = re.compile(
    r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_COMMENT = re.compile(r"/\*.*?\*/")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program, per device."""

    kind: str
    axes: tuple[str, ...]
    dtype: str
    group_size: int
    operand_bytes: int
    result_bytes: int
    operands: int = 1
    name: str = ""
    computation: str = ""
    in_loop: bool = False
    op_name: str = ""
    trips: int = 1

    @property
    def bytes(self) -> int:
        """The nccl-tests "size": the larger of the operand and result buffers."""
        return max(self.operand_bytes, self.result_bytes)

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends with the bandwidth-optimal (ring) algorithm."""
        n = self.group_size
        if n <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2 * self.bytes * (n - 1) / n
        if self.kind == "collective-permute":
            return float(self.bytes)
        return self.bytes * (n - 1) / n


@dataclasses.dataclass(frozen=True)
class Declared:
    """A collective a layer or step promises to compile to.

    `bytes` is per device, in the convention of `Collective.bytes`, summed
    over the `count` instances; `None` means "not declared".
    """

    kind: str
    axes: tuple[str, ...]
    dtype: str
    count: int = 1
    bytes: int | None = None
    why: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Declared(kind={self.kind!r}): expected one of {KINDS}.")
        object.__setattr__(self, "axes", tuple(sorted(self.axes)))


class Report(list):
    """The collectives of one compiled program (a list of `Collective`)."""

    def where(self, kind: str | None = None, axes: Iterable[str] | None = None) -> Report:
        """The collectives of one kind and/or over exactly these axes."""
        want = None if axes is None else tuple(sorted(axes))
        return Report(
            c for c in self if (kind is None or c.kind == kind) and (want is None or c.axes == want)
        )

    def counts(self) -> collections.Counter:
        """`Counter` of (kind, axes, dtype) -> tensors moved (a combined op counts each operand)."""
        out: collections.Counter = collections.Counter()
        for c in self:
            out[(c.kind, c.axes, c.dtype)] += c.operands
        return out

    def kinds(self) -> collections.Counter:
        """`Counter` of kinds only."""
        return collections.Counter(c.kind for c in self)

    def total_bytes(self) -> int:
        """Bytes of the collectives as they stand in the HLO (a loop body's counted once)."""
        return sum(c.bytes for c in self)

    def executed_bytes(self) -> int:
        """Buffer bytes of one call: each collective's `bytes` times its loop trip count."""
        return sum(c.bytes * c.trips for c in self)

    def executed_wire_bytes(self) -> float:
        """Bytes each device sends in one call (ring algorithms), loops counted per trip.

        The figure to compare strategies by: an all-reduce of S bytes and the
        all-gather + reduce-scatter pair that replaces it under sequence
        parallelism both send 2 S (n-1)/n.
        """
        return sum(c.wire_bytes * c.trips for c in self)

    def table(self) -> str:
        """A markdown table, one row per collective."""
        rows = [
            "| kind | axes | dtype | bytes/device | wire bytes/device | runs per call |",
            "|---|---|---|---:|---:|---:|",
        ]
        for c in self:
            loop = " (loop)" if c.in_loop else ""
            rows.append(
                f"| {c.kind} | {','.join(c.axes) or '-'} | {c.dtype} | {c.bytes:,} | "
                f"{c.wire_bytes:,.0f} | {c.trips}{loop} |"
            )
        return "\n".join(rows)


def _type_bytes(type_str: str) -> tuple[int, str]:
    """Total bytes and first element type of an HLO type (array or tuple)."""
    total = 0.0
    first = ""
    for dtype, dims in _ARRAY_TYPE.findall(type_str):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
        first = first or dtype
    return int(total), first


def _split_type(rest: str) -> tuple[str, str]:
    """Split `TYPE op(...)...` into the type and the remainder."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parse_groups(attrs: str) -> list[list[int]] | None:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        # mesh-axes form: mesh['axis_0'=2,'axis_1'=4] {'axis_0'}: a group per
        # combination of the other axes, spanning the named ones (row-major ids)
        names, dims = [], []
        for item in m.group(1).split(","):
            name, _, size = item.partition("=")
            names.append(name.strip().strip("'\""))
            dims.append(int(size))
        over = [names.index(a.strip().strip("'\"")) for a in m.group(2).split(",") if a.strip()]
        rest = [i for i in range(len(dims)) if i not in over]
        ids = np.arange(math.prod(dims)).reshape(dims).transpose(rest + over)
        return ids.reshape(-1, math.prod(dims[i] for i in over)).tolist()
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        out_shape = [int(v) for v in m.group(1).split(",")]
        dims = [int(v) for v in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        return ids.reshape(out_shape).tolist()
    m = re.search(r"replica_groups=\{(\{[0-9,{}\s]*\})?\}", attrs)
    if m:
        if not m.group(1):
            return []  # every device in one group
        return [
            [int(v) for v in g.split(",") if v.strip()]
            for g in re.findall(r"\{([0-9,\s]*)\}", m.group(1))
        ]
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs + "}")
    if m:
        return [[int(v) for v in g.split(",")] for g in re.findall(r"\{([0-9,\s]+)\}", m.group(0))]
    return None


def _axes_of(groups: list[list[int]] | None, mesh: Mesh | None) -> tuple[tuple[str, ...], int]:
    """Mesh axes spanned by replica groups (ids are positions in the mesh's device order)."""
    if mesh is None:
        size = len(groups[0]) if groups else 0
        return (), size
    shape = mesh.devices.shape
    if not groups:
        return tuple(
            sorted(n for n, s in zip(mesh.axis_names, shape, strict=True) if s > 1)
        ), mesh.size
    varying: set[str] = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.array(g), shape))  # [ndim, len(g)]
        for name, row in zip(mesh.axis_names, coords, strict=True):
            if len(set(row.tolist())) > 1:
                varying.add(name)
    return tuple(sorted(varying)), len(groups[0])


def _walk_calls(edges: dict[str, list[tuple[str, int, bool]]], entry: str) -> dict:
    """Per computation reachable from `entry`: (runs per call, inside a loop body).

    `edges[c]` lists `(callee, trip multiplier, is a while body)`; runs are the
    product of the enclosing loops' trip counts (the max over call paths).
    Without an ENTRY line, every computation nobody calls is a root.
    """
    callees = {c for out in edges.values() for c, _, _ in out}
    roots = [entry] if entry else [c for c in edges if c not in callees]
    runs = {root: (1, False) for root in roots}
    todo = list(roots)
    while todo:
        c = todo.pop()
        n, looped = runs[c]
        for callee, mult, body in edges.get(c, ()):
            old_n, old_looped = runs.get(callee, (0, False))
            new = (max(old_n, n * mult), old_looped or looped or body)
            if new != (old_n, old_looped):
                runs[callee] = new
                todo.append(callee)
    return runs


def parse_hlo(hlo_text: str, mesh: Mesh | None = None) -> Report:
    """The collectives of an HLO module's text (as `Compiled.as_text()` prints it)."""
    types: dict[str, str] = {}
    edges: dict[str, list[tuple[str, int, bool]]] = collections.defaultdict(list)
    entry = ""
    found = []
    computation = ""
    for line in hlo_text.splitlines():
        line = _COMMENT.sub("", line)  # /*index=5*/ in long tuple types
        mc = _COMP.match(line)
        if mc and "=" not in line.split("->")[0]:
            computation = mc.group(1)
            if line.lstrip().startswith("ENTRY"):
                entry = computation
            continue
        mi = _INSTR.match(line)
        if not mi:
            continue
        name, rest = mi.groups()
        type_str, rest = _split_type(rest)
        types[name] = type_str
        callees = set(_CALLED.findall(rest))
        for b in _BRANCHES.findall(rest):
            callees.update(x.strip().lstrip("%") for x in b.split(","))
        loop: set[str] = set()
        body: set[str] = set()
        if re.match(r"while\(", rest):
            loop = set(re.findall(r"(?:body|condition)=%?([\w.\-]+)", rest))
            body = set(re.findall(r"body=%?([\w.\-]+)", rest))
        known = re.search(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)', rest)
        trip = int(known.group(1)) if known else 1
        edges[computation] += [(c, trip if c in loop else 1, c in body) for c in callees]
        op = rest.split("(", 1)[0]
        base = op.removesuffix("-start")
        if base not in KINDS or op.endswith("-done"):
            continue
        found.append((name, type_str, op, rest, computation))
    runs = _walk_calls(edges, entry)
    report = Report()
    for name, type_str, op, rest, computation in found:
        kind = op.removesuffix("-start")
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        operand_bytes = sum(_type_bytes(types.get(o, ""))[0] for o in operands)
        result_bytes, dtype = _type_bytes(type_str)
        groups = _parse_groups(rest)
        axes, group_size = _axes_of(groups, mesh)
        if op.endswith("-start"):
            # async pairs: the start's type bundles operands and results
            result_bytes = operand_bytes
            if kind == "all-gather":
                result_bytes = operand_bytes * group_size
            elif kind == "reduce-scatter":
                result_bytes = operand_bytes // max(group_size, 1)
        if not dtype:
            dtype = _type_bytes(types.get(operands[0], ""))[1] if operands else ""
        meta = re.search(r'op_name="([^"]*)"', rest)
        report.append(
            Collective(
                kind=kind,
                axes=axes,
                dtype=dtype,
                group_size=group_size,
                operand_bytes=operand_bytes,
                result_bytes=result_bytes,
                operands=max(len(operands), 1),
                name=name,
                computation=computation,
                in_loop=runs.get(computation, (1, False))[1],
                trips=runs.get(computation, (1, False))[0],
                op_name=meta.group(1) if meta else "",
            )
        )
    return report


def _find_mesh(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def compile_fn(fn: Callable, *args, **kwargs) -> jax.stages.Compiled:
    """`fn` (jitted or not) lowered and compiled for `args`."""
    if not hasattr(fn, "lower"):
        fn = jax.jit(fn)
    return fn.lower(*args, **kwargs).compile()


def collectives(fn: Callable, *args, mesh: Mesh | None = None, **kwargs) -> Report:
    """Compile `fn(*args, **kwargs)` and return the collectives of its compiled HLO.

    Args:
      fn: a function, jitted or not (an `nnx.jit` function works too).
      *args: example arguments (arrays or `jax.ShapeDtypeStruct`s with shardings).
      mesh: the mesh whose axes name the replica groups; default: the mesh of
        the first argument with a `NamedSharding`, else the one set with
        `jax.set_mesh`.
      **kwargs: keyword arguments of `fn`.

    Returns:
      A `Report`: a list of `Collective`, in program order.
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


def memory(fn: Callable, *args, **kwargs) -> Memory:
    """Per-device memory of `fn` compiled for `args`."""
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
