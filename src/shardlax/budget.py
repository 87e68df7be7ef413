"""A memory-budget planner for FSDP units: keep gathered parameters where memory allows.

`plan(build, budget_bytes, units=..., batch=...)` chooses, per FSDP unit,
whether to keep its gathered parameters from the forward to the backward
(`reshard_after_forward=False`: one all-gather per parameter instead of two)
and whether to rematerialise it (`remat`: recompute its forward in the
backward instead of saving its activations), so that the bytes each device
sends per training step are the fewest among the plans it tries whose peak
per-device memory fits `budget_bytes`. FSDP2's `reshard_after_forward` and
DeepSpeed's `max_live_parameters` are the same knobs set by hand; here every
figure comes from the compiled program.

How: the user writes `build(choices)`, which builds the model **abstractly**
(`nnx.eval_shape`) with `choices[unit].reshard_after_forward` and
`choices[unit].remat` applied, and returns a `shardlax.Trainer` (its step is
compiled for `trainer.abstract_state()` and `batch`), an `nnx.Module` (with
`loss=`: `nnx.jit(nnx.value_and_grad(loss))` is compiled for `(model,
batch)`), or an already lowered / compiled program. Each configuration is
lowered and compiled once, nothing allocated, and read with
`shardlax.audit.memory` (peak = arguments + outputs + temp - donated) and
`shardlax.audit.collectives` (`Report.executed_wire_bytes`).

Search (a few compiles, not one per subset): per unit, three levels from
least memory to fewest wire bytes: (reshard, remat), (reshard, no remat),
(keep, no remat); keeping *and* rematerialising a unit gathers twice anyway
(the recomputation gathers again), so it is never tried.

  1. the extremes: every unit at each level (remat is used for the units
     that reshard only when it lowers that extreme's peak).
  2. which units keep their parameters: units in `order` (default: last
     unit first, as FSDP2 does not reshard the last unit: its backward
     starts right after its forward, and keeping it skips a re-gather, which
     can even *lower* the peak), the first k keep, the others reshard; k by
     bisection, taking the peak as monotone in k from k = 1.
  3. which resharding units can drop remat (less recomputation, same wire
     bytes): the same bisection over the units that reshard.

Every configuration is verified by its compile; the plan is the fitting one
with the fewest wire bytes (then the fewest rematerialised units, then the
lowest peak). When none fits, a `ValueError` names the smallest budget that
does (the lowest peak compiled). Non-monotone memory (XLA's scheduling) can only make the
search miss a better plan, never return one that does not fit.

Example (a stack of `fully_shard` blocks; see the README's FSDP section)::

    def build(choices):
        model = nnx.eval_shape(lambda: Stack(choices, rngs=nnx.Rngs(0)))
        return shardlax.Trainer(model, optax.adam(1e-3), loss_fn, mesh=mesh)

    p = shardlax.budget.plan(build, 2**30, units=range(48), batch=batch)
    print(p.table())
    trainer = shardlax.Trainer(Stack(p.choices, rngs=nnx.Rngs(0)), ...)  # to train

References:
  Zhao et al., "PyTorch FSDP", 2023 (arXiv:2304.11277): `reshard_after_forward`.
  Rajbhandari et al., "ZeRO-Infinity", 2021 (arXiv:2104.07857): DeepSpeed's
  `stage3_max_live_parameters`.
  Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016 (arXiv:1604.06174).
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from shardlax._figures import Figures, figures_of

__all__ = ["Choice", "Figures", "Plan", "measure", "plan"]


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one FSDP unit does (the arguments `build` applies to it).

    Attributes:
      reshard_after_forward: free the gathered parameters after the forward
        and gather them again in the backward (`fully_shard`'s argument).
      remat: recompute the unit's forward in the backward (`nnx.remat` /
        `jax.checkpoint` around the unit, or `fully_shard_scan(remat=)`).
    """

    reshard_after_forward: bool = True
    remat: bool = False

    def __str__(self) -> str:
        keep = "reshard" if self.reshard_after_forward else "keep"
        return keep + ("+remat" if self.remat else "")


#: the three levels a unit can take, least memory first (see the module docstring)
LEVELS = (Choice(True, True), Choice(True, False), Choice(False, False))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer: a choice per unit and the compiled figures that back it.

    Attributes:
      choices: unit -> `Choice`, for every unit (pass it to `build`).
      budget_bytes: the per-device budget asked for.
      predicted: the figures of the chosen configuration's compiled program.
      extremes: the same for every unit at one level: ``'reshard'``
        (FSDP2's default: reshard, no remat), ``'reshard+remat'`` (absent
        with ``remat=False``) and ``'no_reshard'`` (every unit keeps).
      compiles: the configurations compiled for this plan (cached ones not counted).
      tried: the figures of every configuration compiled (this plan's and the
        cache's), keyed by ``((repr(unit), reshard_after_forward, remat), ...)``.
    """

    choices: dict[Hashable, Choice]
    budget_bytes: int
    predicted: Figures
    extremes: dict[str, Figures]
    compiles: int
    tried: dict[tuple, Figures] = dataclasses.field(repr=False, default_factory=dict)

    @property
    def kept(self) -> tuple:
        """The units that keep their gathered parameters (reshard_after_forward=False)."""
        return tuple(u for u, c in self.choices.items() if not c.reshard_after_forward)

    @property
    def rematerialised(self) -> tuple:
        return tuple(u for u, c in self.choices.items() if c.remat)

    def table(self) -> str:
        """A markdown table: the plan beside the three extremes (per device, per step)."""
        rows = [
            f"budget {_fmt(self.budget_bytes)} per device; {len(self.choices)} units, "
            f"{len(self.kept)} keep their gathered parameters, {len(self.rematerialised)} "
            f"rematerialised; {self.compiles} compiles",
            "",
            "| configuration | peak | arguments | temp | all-gathers/step | wire bytes/step |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        named = [("plan", self.predicted)]
        named += [(k.replace("_", " "), f) for k, f in self.extremes.items()]
        for name, f in named:
            fits = "" if f.peak <= self.budget_bytes else " (over budget)"
            rows.append(
                f"| {name}{fits} | {_fmt(f.peak)} | {_fmt(f.arguments)} | {_fmt(f.temp)} | "
                f"{f.all_gathers} | {_fmt(f.wire_bytes)} |"
            )
        rows += ["", "choices: " + ", ".join(f"{u}: {c}" for u, c in self.choices.items())]
        return "\n".join(rows)


def _fmt(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _compile(built: Any, batch: Any, loss: Callable | None) -> tuple[Any, Any]:
    """The compiled program of what `build` returned, and the mesh that names its axes."""
    from flax import nnx

    from shardlax import audit
    from shardlax.train import Trainer

    stage = audit._stage(built)
    if stage is not None:
        return audit.compile_fn(stage), None
    if isinstance(built, Trainer):
        state = built.abstract_state()
        return built.step.lower(state, batch).compile(), built.mesh
    if isinstance(built, nnx.Module):
        if loss is None:
            raise TypeError(
                f"budget.plan: build returned a {type(built).__name__} (an nnx.Module) and no "
                f"loss= was given, so there is no training step to compile. Pass "
                f"loss=lambda model, batch: ..., or return a shardlax.Trainer from build."
            )
        fn = nnx.jit(nnx.value_and_grad(loss))
        return fn.lower(built, batch).compile(), None
    raise TypeError(
        f"budget.plan: build returned a {type(built).__name__}; expected a shardlax.Trainer, "
        f"an nnx.Module (with loss=), or a jax.stages.Lowered / Compiled step. Return "
        f"shardlax.Trainer(model, tx, loss_fn, mesh=mesh) from build."
    )


def measure(
    build: Callable[[dict[Hashable, Choice]], Any],
    choices: Mapping[Hashable, Choice],
    *,
    batch: Any = None,
    loss: Callable | None = None,
) -> Figures:
    """Compile `build(choices)`'s training step (abstractly) and return its figures.

    Args:
      build, batch, loss: as `plan`.
      choices: unit -> `Choice`.
    """
    t0 = time.perf_counter()
    compiled, mesh = _compile(build(dict(choices)), batch, loss)
    return figures_of(compiled, mesh=mesh, compile_s=time.perf_counter() - t0)


def _check_args(budget_bytes, units, order, build, remat) -> tuple[int, list, list]:
    if not callable(build):
        raise TypeError(
            f"budget.plan(build={build!r}): expected a callable choices -> Trainer (or "
            f"nnx.Module). Pass a function that builds the model with nnx.eval_shape from "
            f"choices[unit].reshard_after_forward / .remat."
        )
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real):
        raise TypeError(
            f"budget.plan(budget_bytes={budget_bytes!r}): expected a number of bytes per "
            f"device, got {type(budget_bytes).__name__}. Pass e.g. budget_bytes=16 * 2**30."
        )
    if not budget_bytes > 0:
        raise ValueError(
            f"budget.plan(budget_bytes={budget_bytes!r}): the per-device budget must be "
            f"positive. Pass the bytes one device may use, e.g. budget_bytes=16 * 2**30."
        )
    if isinstance(units, numbers.Integral) and not isinstance(units, bool):
        units = range(int(units))
    if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
        raise TypeError(
            f"budget.plan(units={units!r}): expected the unit names build understands (a "
            f"sequence such as ['embed', 0, 1, 'head'] or range(48)), or their number."
        )
    units = list(units)
    if not units:
        raise ValueError(
            "budget.plan(units=[]): there is no unit to plan. Pass the names of the "
            "fully_shard units build applies the choices to, e.g. units=range(n_layers)."
        )
    dup = sorted({repr(u) for u in units if units.count(u) > 1})
    if dup:
        raise ValueError(
            f"budget.plan(units=...): {', '.join(dup)} appear more than once. Name each unit once."
        )
    if order is None:
        order = units[::-1]
    else:
        order = list(order)
        if sorted(map(repr, order)) != sorted(map(repr, units)) or len(order) != len(units):
            raise ValueError(
                f"budget.plan(order={order!r}): expected every unit of units={units!r} exactly "
                f"once, in the order the planner should try keeping their parameters. Pass a "
                f"permutation of units (default: last unit first)."
            )
    if not isinstance(remat, bool):
        raise TypeError(
            f"budget.plan(remat={remat!r}): expected True (the planner may rematerialise "
            f"units) or False (never)."
        )
    return int(budget_bytes), units, order


def plan(
    build: Callable[[dict[Hashable, Choice]], Any],
    budget_bytes: int,
    *,
    units: Sequence[Hashable] | int,
    batch: Any = None,
    loss: Callable | None = None,
    order: Sequence[Hashable] | None = None,
    remat: bool = True,
    cache: dict | None = None,
) -> Plan:
    """Per unit: keep gathered parameters? rematerialise? Fewest wire bytes within a budget.

    Args:
      build: ``build(choices) -> Trainer | nnx.Module | Lowered | Compiled``,
        where `choices` maps every unit to a `Choice`; it applies
        ``choices[u].reshard_after_forward`` to `fully_shard` (or
        `fully_shard_scan`) and ``choices[u].remat`` to the unit's call. Build
        the model with `nnx.eval_shape` so that nothing is allocated.
      budget_bytes: the per-device memory budget, compared with the compiled
        step's peak (arguments + outputs + temp - donated).
      units: the unit names `build` understands (e.g. ``range(n_layers)``,
        or ``['embed', *range(n), 'head']``), or their number.
      batch: the step's batch (arrays or `jax.ShapeDtypeStruct`s with shardings):
        ``trainer.step(state, batch)``, or ``loss(model, batch)``.
      loss: ``loss(model, batch) -> scalar`` when `build` returns a module.
      order: the order in which units are offered to keep their parameters
        (default: last unit first). The units that keep are a prefix of it,
        so for units of different sizes put first those that save the most
        wire bytes per byte of memory.
      remat: whether the planner may rematerialise units (False: never).
      cache: a dict; figures of configurations compiled before with it are
        reused (pass the same dict to plan several budgets for the same
        `build` and `batch`).

    Returns:
      A `Plan`: `choices`, `predicted` figures (the compiled program's), the
      extremes, and `table()`.

    Raises:
      ValueError: no configuration fits the budget (the message names the
        smallest budget that does), or bad arguments.
    """
    budget, units, order = _check_args(budget_bytes, units, order, build, remat)
    tried: dict[tuple, Figures] = {} if cache is None else cache
    compiled_before = len(tried)

    def key(choices: Mapping) -> tuple:
        return tuple((repr(u), choices[u].reshard_after_forward, choices[u].remat) for u in units)

    def figures(choices: dict) -> Figures:
        k = key(choices)
        if k not in tried:
            tried[k] = measure(build, choices, batch=batch, loss=loss)
        return tried[k]

    def uniform(level: Choice) -> dict:
        return {u: level for u in units}

    remat_all, reshard_all, keep_all = LEVELS
    extremes = {"reshard": figures(uniform(reshard_all))}
    if remat:
        extremes["reshard+remat"] = figures(uniform(remat_all))
    extremes["no_reshard"] = figures(uniform(keep_all))
    # the filler of the units that reshard: remat only when it lowers the peak
    filler = reshard_all
    if remat and extremes["reshard+remat"].peak < extremes["reshard"].peak:
        filler = remat_all

    def fits(config: dict) -> bool:
        return figures(config).peak <= budget

    def with_kept(k: int, level: Choice = filler, rest: Sequence = ()) -> dict:
        """The first k units of `order` keep; units in `rest` get `level`; others the filler."""
        out = {u: filler for u in units}
        for u in rest:
            out[u] = level
        for u in order[:k]:
            out[u] = keep_all
        return out

    def largest_fitting(lo: int, hi: int, config: Callable[[int], dict]) -> int:
        """The largest k in [lo, hi] whose config fits (config(lo) does), by bisection."""
        if fits(config(hi)):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(config(mid)) else (lo, mid)
        return lo

    # Keeping the first unit of `order` can *lower* the peak (the last layer's
    # re-gather is skipped, and its backward starts right after its forward), so
    # the bisection starts from 1 kept unit when that fits, else from none.
    start = next((k for k in (1, 0) if k <= len(order) and fits(with_kept(k))), None)
    if start is not None:
        k = largest_fitting(start, len(order), with_kept)
        if filler == remat_all:
            # units that drop remat, in `order` too (by default the last layers, whose
            # activations live shortest; the first layers keep remat longest)
            offer = list(order[k:])
            largest_fitting(0, len(offer), lambda j: with_kept(k, reshard_all, offer[:j]))

    mine = {k: f for k, f in tried.items() if _same_units(k, units)}
    fitting = [(k, f) for k, f in mine.items() if f.peak <= budget]
    if not fitting:
        low_key, low = min(mine.items(), key=lambda item: item[1].peak)
        how = ", ".join(f"{u}: {Choice(r, m)}" for u, r, m in low_key)
        raise ValueError(
            f"budget.plan(budget_bytes={budget}): no plan fits {_fmt(budget)} per device. The "
            f"smallest feasible budget is {low.peak} bytes ({_fmt(low.peak)}; the lowest peak "
            f"of the {len(mine)} configurations compiled: {how}; arguments "
            f"{_fmt(low.arguments)}, temp {_fmt(low.temp)}). Raise budget_bytes to at least "
            f"{low.peak}, or lower the memory itself: a smaller batch per device, more "
            f"devices on the fsdp axis, or remat inside the units."
        )

    def rank(item: tuple[tuple, Figures]) -> tuple:
        k, f = item
        return (f.wire_bytes, sum(r for _, _, r in k), f.peak)

    best_key, best = min(fitting, key=rank)
    by_repr = {repr(u): u for u in units}
    choices = {by_repr[u]: Choice(r, m) for u, r, m in best_key}
    return Plan(
        choices=choices,
        budget_bytes=budget,
        predicted=best,
        extremes=extremes,
        compiles=len(tried) - compiled_before,
        tried=dict(tried),
    )


def _same_units(k: tuple, units: Sequence) -> bool:
    return tuple(u for u, _, _ in k) == tuple(repr(u) for u in units)
