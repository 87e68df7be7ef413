"""`shardlax.budget.plan`: per-unit reshard/remat choices within a memory budget.

Compile-only (abstract models, nothing allocated) on 8 devices. The reference of
every test is a brute force: each configuration of the search space compiled
here, independently of the planner, and read with `audit.memory` /
`audit.collectives`; the best plan for a budget is the fitting configuration
with the fewest wire bytes.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.budget import Choice
from tests import utils

N = 8
# scanned stack: one unit, L layers of D x D; batch large enough that remat matters
L, D, B = 4, 64, 64
# unrolled stack: 3 fully_shard blocks D2 -> F2 -> D2
L2, D2, F2, B2 = 3, 32, 128, 64


class Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.linear(h))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D2, F2, rngs=rngs)
        self.down = nnx.Linear(F2, D2, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class Stack(nnx.Module):
    """L2 `fully_shard` blocks, block i built with choices[i]."""

    def __init__(self, choices, mesh, rngs: nnx.Rngs):
        self.blocks = nnx.List(
            [
                shardlax.fully_shard(
                    Block(rngs), mesh=mesh, reshard_after_forward=choices[i].reshard_after_forward
                )
                for i in range(L2)
            ]
        )
        self.remat = tuple(choices[i].remat for i in range(L2))

    def __call__(self, x):
        for block, remat in zip(self.blocks, self.remat, strict=True):
            x = nnx.remat(lambda m, h: m(h))(block, x) if remat else block(x)
        return x


def scan_loss(m, x):
    return jnp.sum(m(x) ** 2)


def stack_loss(m, batch):
    x, y = batch
    return jnp.mean((m(x) - y) ** 2)


@functools.cache
def mesh():
    return utils.mesh(1, N, 1)


def build_scan(choices):
    c = choices["stack"]
    return nnx.eval_shape(
        lambda: shardlax.fsdp.fully_shard_scan(
            Layer, L, rngs=nnx.Rngs(0), mesh=mesh(), remat=c.remat,
            reshard_after_forward=c.reshard_after_forward,
        )
    )  # fmt: skip


def build_stack(choices):
    model = nnx.eval_shape(lambda: Stack(choices, mesh(), nnx.Rngs(0)))
    return shardlax.Trainer(model, optax.sgd(0.1), stack_loss, mesh=mesh(), strategy="fsdp")


def act(b, d):
    return jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=NamedSharding(mesh(), P("fsdp")))


def figures(compiled):
    """(peak, arguments, temp, wire bytes) of a compiled step, read here with the audit."""
    m = audit.memory(compiled)
    wire = audit.collectives(compiled, mesh=mesh()).executed_wire_bytes()
    return (m.arguments + m.outputs + m.temp - m.alias, m.arguments, m.temp, wire)


def predicted(plan):
    f = plan.predicted
    return (f.peak, f.arguments, f.temp, f.wire_bytes)


def best(brute, budget):
    """Fewest wire bytes among the configurations that fit (ties: fewer remat, lower peak)."""
    fitting = [(k, f) for k, f in brute.items() if f[0] <= budget]
    return min(fitting, key=lambda kf: (kf[1][3], sum(c.remat for c in kf[0]), kf[1][0]))


LEVELS = (Choice(True, True), Choice(True, False), Choice(False, False))
#: the planner's compiles of the unrolled stack, shared by its tests (an optimisation only:
#: a test run alone fills it itself)
STACK_CACHE: dict = {}


@functools.cache
def scan_brute():
    out = {}
    for c in LEVELS:
        fn = nnx.jit(nnx.value_and_grad(scan_loss))
        out[(c,)] = figures(fn.lower(build_scan({"stack": c}), act(B, D)).compile())
    return out


@functools.cache
def stack_brute():
    out = {}
    for reshard in itertools.product((True, False), repeat=L2):
        cs = tuple(Choice(r, False) for r in reshard)
        trainer = build_stack(dict(enumerate(cs)))
        batch = (act(B2, D2), act(B2, D2))
        out[cs] = figures(trainer.step.lower(trainer.abstract_state(), batch).compile())
    return out


def test_scan_unit_tight_medium_loose_budgets():
    """One scanned unit: remat under a tight budget, reshard under a medium one, keep
    under a loose one; each plan's figures equal the independently compiled program's."""
    brute = scan_brute()
    remat, reshard, keep = (brute[(c,)] for c in LEVELS)
    # what makes the three budgets distinct (measured: peak 58,340 < 89,004 < 140,204
    # bytes; wire 174,727 > 173,831 > 116,487)
    assert remat[0] < reshard[0] < keep[0], brute
    assert remat[3] >= reshard[3] > keep[3], brute
    cache: dict = {}
    for budget in (remat[0], (reshard[0] + keep[0]) // 2, keep[0] + 1):
        p = shardlax.budget.plan(
            build_scan, budget, units=["stack"], batch=act(B, D), loss=scan_loss, cache=cache
        )
        want, want_figures = best(brute, budget)
        assert (p.choices["stack"],) == want, (budget, p.table())
        assert predicted(p) == want_figures, p.table()
        assert p.predicted.peak <= budget
    assert p.extremes["no_reshard"].wire_bytes == keep[3]
    assert len(cache) == 3  # one compile per configuration, reused across budgets


def test_unrolled_units_match_brute_force():
    """3 `fully_shard` blocks through the Trainer: for budgets from the lowest peak of
    all 2^3 reshard choices to the highest, the plan sends the fewest wire bytes any
    fitting configuration sends, and its figures are those of its own compile."""
    brute = stack_brute()
    peaks = sorted({f[0] for f in brute.values()})
    kept = []
    for budget in (peaks[0], peaks[len(peaks) // 2], peaks[-1]):
        p = shardlax.budget.plan(
            build_stack, budget, units=L2, batch=(act(B2, D2), act(B2, D2)), remat=False,
            cache=STACK_CACHE,
        )  # fmt: skip
        cs = tuple(p.choices[i] for i in range(L2))
        _, want = best(brute, budget)
        assert p.predicted.wire_bytes == want[3], (budget, p.table())
        assert predicted(p) == brute[cs], p.table()
        assert p.predicted.peak <= budget
        kept.append(len(p.kept))
        over = "no reshard (over budget)" in p.table()
        assert over == (p.extremes["no_reshard"].peak > budget), p.table()
    assert kept[0] < kept[-1] == L2, kept  # the loose budget keeps every unit
    assert len(STACK_CACHE) < len(brute)  # the planner compiles fewer than every subset


def test_infeasible_budget_names_the_smallest_feasible_one():
    smallest = min(f[0] for f in stack_brute().values())
    with pytest.raises(ValueError, match=rf"smallest feasible budget is {smallest} bytes"):
        shardlax.budget.plan(
            build_stack, smallest - 1, units=L2, batch=(act(B2, D2), act(B2, D2)), remat=False,
            cache=STACK_CACHE,
        )  # fmt: skip


def _never(choices):
    raise AssertionError("build must not be called for bad arguments")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(budget_bytes=-1), ValueError, r"budget_bytes=-1\): the per-device budget must be"),
        (dict(budget_bytes="1GiB"), TypeError, r"budget_bytes='1GiB'\): expected a number"),
        (dict(units=[]), ValueError, r"units=\[\]\): there is no unit"),
        (dict(units=[0, 0]), ValueError, r"0 appear more than once"),
        (dict(units="ab"), TypeError, r"units='ab'\): expected the unit names"),
        (dict(order=[0]), ValueError, r"order=\[0\]\): expected every unit"),
        (dict(remat="yes"), TypeError, r"remat='yes'\): expected True"),
        (dict(build=42), TypeError, r"build=42\): expected a callable"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(build=_never, budget_bytes=2**20, units=[0, 1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        shardlax.budget.plan(args.pop("build"), args.pop("budget_bytes"), **args)


def test_build_returning_the_wrong_thing():
    with pytest.raises(TypeError, match=r"build returned a int; expected a shardlax.Trainer"):
        shardlax.budget.plan(lambda choices: 42, 2**20, units=1)
    with pytest.raises(TypeError, match=r"build returned a Linear .*and no loss= was given"):
        shardlax.budget.plan(lambda choices: nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 2**20, units=1)


def test_build_may_return_a_lowered_step():
    """`build` returning an `nnx.jit(...).lower(...)` stage plans as the module path does."""
    brute = scan_brute()
    remat, reshard, _ = (brute[(c,)] for c in LEVELS)
    budget = (remat[0] + reshard[0]) // 2

    def build(choices):
        return nnx.jit(nnx.value_and_grad(scan_loss)).lower(build_scan(choices), act(B, D))

    p = shardlax.budget.plan(build, budget, units=["stack"])
    want, want_figures = best(brute, budget)
    assert (p.choices["stack"],) == want == (Choice(True, True),), p.table()
    assert predicted(p) == want_figures
