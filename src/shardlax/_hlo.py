"""The collectives of an HLO module's text: `parse_hlo`, and the `Collective`s it reports.

Reads what `Compiled.as_text()` prints: each collective instruction's kind,
dtype and operand / result bytes; its replica groups (explicit `{{0,1},...}`,
iota `[n,k]<=[dims]T(perm)`, Shardy's `mesh[...] {'a':(p)k}` with sub-axes
and `device_ids=`, collective-permute pairs), mapped to the mesh axes they
span; and the trip counts of the loops around it. `shardlax.audit`
re-exports `parse_hlo`, `Collective` and `Report`, and compiles the programs
it reads.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import re
from collections.abc import Iterable

import numpy as np
from jax.sharding import Mesh

from shardlax.declarations import DTYPE_BYTES as _DTYPE_BYTES
from shardlax.declarations import KINDS, wire_bytes

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
    #: the device groups, as positions in the mesh's device order (`mesh.devices.flat`)
    groups: tuple[tuple[int, ...], ...] = ()
    #: False when a group spans only part of one of `axes` (a sub-axis, or an irregular
    #: group); always True for a collective-permute, whose groups are (source, target) pairs
    whole_axes: bool = True

    @property
    def bytes(self) -> int:
        """The nccl-tests "size": the larger of the operand and result buffers."""
        return max(self.operand_bytes, self.result_bytes)

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends with the bandwidth-optimal (ring) algorithm."""
        return wire_bytes(self.kind, self.bytes, self.group_size)


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


def _iota(text: str) -> np.ndarray:
    """Device ids of an iota list `[dims]T(perm)` or an explicit `0,2,1,3` (flat)."""
    m = re.fullmatch(r"\s*\[([0-9,]+)\](?:T\(([0-9,]+)\))?\s*", text)
    if m:
        dims = [int(v) for v in m.group(1).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(2):
            ids = ids.transpose([int(v) for v in m.group(2).split(",")])
        return ids.reshape(-1)
    return np.array([int(v) for v in text.split(",") if v.strip()], dtype=np.int64)


_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]"
    r"(?:,\s*device_ids=\((\[[0-9,]*\](?:T\([0-9,]*\))?|[0-9,\s]*)\))?"
    r"\s*\{([^}]*)\}"
)
_SUB_AXIS = re.compile(r"^['\"]?([^'\":]+)['\"]?(?::\((\d+)\)(\d+))?$")


def _mesh_groups(dims_text: str, device_ids: str | None, over_text: str) -> list[list[int]]:
    """Groups of Shardy's mesh form: `mesh['a'=4,'b'=2], device_ids=(...) {'a':(2)2, 'b'}`.

    A group per combination of the axes not named in the braces, spanning the
    named ones, in the order named. `'a':(p)k` is the sub-axis of size k of
    axis `a` whose major sub-axes multiply to p (Shardy's `(pre_size)size`):
    axis `a` of size A splits row-major into (p, k, A/(p k)) and the group
    spans the middle factor. Mesh positions are row-major; `device_ids` maps
    each position to its device id (iota `[dims]T(perm)` or an explicit list;
    default: the identity).
    """
    names, sizes = [], []
    for item in dims_text.split(","):
        name, _, size = item.partition("=")
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    refs = []  # (axis index, pre, size)
    for item in over_text.split(","):
        item = item.strip()
        if not item:
            continue
        m = _SUB_AXIS.match(item)
        if not m or m.group(1) not in names:
            raise ValueError(
                f"audit.parse_hlo: replica-group axis {item} is not an axis of "
                f"mesh[{dims_text}]; groups name the axes of their own mesh."
            )
        i = names.index(m.group(1))
        pre, size = (int(m.group(2)), int(m.group(3))) if m.group(2) else (1, sizes[i])
        if sizes[i] % (pre * size):
            raise ValueError(
                f"audit.parse_hlo: replica-group sub-axis {item} of axis {names[i]!r} "
                f"(size {sizes[i]}): a sub-axis (p)k needs p*k = {pre * size} to divide "
                f"{sizes[i]}. This is not a valid Shardy mesh group; pass the HLO as "
                f"Compiled.as_text() prints it."
            )
        refs.append((i, pre, size))
    # Cut each axis into factors at every sub-axis boundary (products from the major side).
    cuts = [{1, s} for s in sizes]
    for i, pre, size in refs:
        cuts[i] |= {pre, pre * size}
    factors, first = [], []  # factor sizes; index of each axis' first factor
    bounds = []  # per axis: sorted cut points
    for i, _s in enumerate(sizes):
        pts = sorted(cuts[i])
        bounds.append(pts)
        first.append(len(factors))
        factors += [b // a for a, b in itertools.pairwise(pts)]
    over: list[int] = []
    for i, pre, size in refs:
        pts = bounds[i]
        lo, hi = pts.index(pre), pts.index(pre * size)
        over += [first[i] + j for j in range(lo, hi)]
    n = math.prod(sizes)
    ids = _iota(device_ids) if device_ids else np.arange(n)
    if ids.size != n:
        raise ValueError(
            f"audit.parse_hlo: device_ids=({device_ids}) lists {ids.size} devices, but "
            f"mesh[{dims_text}] has {n}; each mesh position needs one device id."
        )
    rest = [j for j in range(len(factors)) if j not in over]
    arr = ids.reshape(factors).transpose(rest + over)
    return arr.reshape(-1, math.prod(factors[j] for j in over)).tolist()


def _parse_groups(attrs: str) -> list[list[int]] | None:
    m = _MESH_GROUPS.search(attrs)
    if m:
        return _mesh_groups(m.group(1), m.group(2), m.group(3))
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


def _axes_of(
    groups: list[list[int]] | None, mesh: Mesh | None, num_devices: int = 0
) -> tuple[tuple[str, ...], int, tuple[tuple[int, ...], ...], bool]:
    """Mesh axes spanned by replica groups (ids are positions in the mesh's device order).

    Returns (axes, group size, groups, whole_axes); `whole_axes` is False when
    the groups span only part of an axis (their size is not the product of the
    axes' sizes). Empty groups (`replica_groups={}`) mean one group of every device.
    """
    n = mesh.size if mesh is not None else num_devices
    if not groups:
        groups = [list(range(n))] if n else []
    tupled = tuple(tuple(int(v) for v in g) for g in groups)
    if mesh is None:
        return (), (len(groups[0]) if groups else 0), tupled, True
    shape = mesh.devices.shape
    varying: set[str] = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.array(g), shape))  # [ndim, len(g)]
        for name, row in zip(mesh.axis_names, coords, strict=True):
            if len(set(row.tolist())) > 1:
                varying.add(name)
    size = len(groups[0])
    whole = size == math.prod(mesh.shape[a] for a in varying)
    return tuple(sorted(varying)), size, tupled, whole


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
    header = re.search(r"^HloModule\b.*?\bnum_partitions=(\d+)", hlo_text, re.M)
    num_devices = int(header.group(1)) if header else 0
    report = Report()
    for name, type_str, op, rest, computation in found:
        kind = op.removesuffix("-start")
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        operand_bytes = sum(_type_bytes(types.get(o, ""))[0] for o in operands)
        result_bytes, dtype = _type_bytes(type_str)
        groups = _parse_groups(rest)
        axes, group_size, device_groups, whole = _axes_of(groups, mesh, num_devices)
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
                groups=device_groups,
                whole_axes=whole or kind == "collective-permute",  # groups are (src, dst) pairs
            )
        )
    return report
