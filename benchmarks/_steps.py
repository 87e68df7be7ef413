"""Building blocks of the layer benchmark: candidates, rows, steps, the models' plain twins.

A `Row` is one training step of one parallel strategy, built three ways
(`Candidate`s): shardlax, the same math under GSPMD, and one device. Every
candidate's step is `step(state, batch) -> (state, loss)`, jitted, donating
its state. See `layers.py` for what is measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax

LR = 1e-2
IMPLS = ("shardlax", "gspmd", "unsharded")


class Skip(Exception):
    """A row whose shardlax feature does not exist (yet)."""


@dataclasses.dataclass
class Candidate:
    """One way to run a step: `fn(state, batch) -> (state, loss or {'loss': ...})`.

    `fn` is jitted and donates `state`; the benchmark carries the returned
    state into the next call, as a training loop does.
    """

    fn: Any
    state: Any
    batch: Any
    mesh: Any = None


@dataclasses.dataclass
class Row:
    name: str
    strategy: str
    mesh: str
    config: dict
    candidates: dict[str, Candidate]
    minimum: list[dict]  # {kind, axes, bytes, count, why}, bytes per instance per device
    loop_trips: int = 1
    #: "minimum" (the least the strategy needs) or "declared" (what the model declares)
    reference: str = "minimum"
    #: how the GSPMD candidate is set up (every report says which baseline it beat)
    baseline: str = ""


def wire_factor(kind: str, n: int) -> float:
    """Bytes each device sends per byte of S with the ring algorithm (as `shardlax.audit`)."""
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n
    if kind == "collective-permute":
        return 1.0
    return (n - 1) / n


def minimum(kind: str, axes, nbytes: int, n: int, count: int = 1, why: str = "") -> dict:
    """A collective the strategy cannot do without: `count` x `nbytes` (S) over `n` devices."""
    return {
        "kind": kind,
        "axes": list(axes),
        "bytes": int(nbytes),
        "wire_bytes": nbytes * wire_factor(kind, n),
        "group_size": n,
        "count": count,
        "why": why,
    }


def place(tree, mesh, spec_of: Callable[[str], Any]):
    """`device_put` every leaf with `NamedSharding(mesh, spec_of(path))`."""

    def put(path, v):
        return jax.device_put(v, NamedSharding(mesh, spec_of(jax.tree_util.keystr(path))))

    return jax.tree_util.tree_map_with_path(put, tree)


def constraint(mesh, spec) -> Callable:
    """`x -> with_sharding_constraint(x, NamedSharding(mesh, spec))`: pins an activation.

    The GSPMD twins pin their residual stream / activations this way, as MaxText
    does: without it, sharding propagation may replicate activations at scale (a
    TinyLM-like model on 64 devices needed 161 GB temp per device unconstrained,
    4.1 GB constrained).
    """
    sharding = NamedSharding(mesh, spec)
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _pin(constrain, x):
    return x if constrain is None else constrain(x)


def unconstrained(model):
    """A copy of a plain twin without its activation constraints (for the one-device run)."""
    model = nnx.clone(model)
    if hasattr(model, "constrain"):
        model.constrain = None
    return model


def on_device(tree, device):
    return jax.tree.map(lambda v: jax.device_put(v, device), tree)


def adam():
    return optax.adam(LR)


def optax_step(graphdef, tx, loss_fn: Callable, out_shardings=None) -> Callable:
    """Jitted `step((params, opt_state), batch) -> ((params, opt_state), loss)`, donating the state.

    The model's parameters are the `nnx.Param`s of `graphdef`; `loss_fn(model, batch)`.
    """

    def step(state, batch):
        params, opt_state = state

        def loss_of(params):
            return loss_fn(nnx.merge(graphdef, params), batch)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    if out_shardings is not None:
        return jax.jit(step, donate_argnums=0, out_shardings=(out_shardings, None))
    return jax.jit(step, donate_argnums=0)


def mse(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def plain_candidates(plain, batch, gspmd_mesh, param_spec, batch_spec, devices, opt_spec=None):
    """GSPMD and unsharded candidates of a plain nnx model trained with Adam on MSE.

    param_spec(path) / opt_spec(path) -> PartitionSpec of a parameter / optimizer
    state leaf under GSPMD (opt_spec defaults to param_spec); batch_spec: the
    spec of each batch array. The state's shardings are pinned as outputs too,
    so the step keeps its layout from one call to the next.
    """
    graphdef, params = nnx.split(plain)
    tx = adam()
    opt_state = tx.init(params)
    opt_spec = opt_spec or param_spec
    g_state = (place(params, gspmd_mesh, param_spec), place(opt_state, gspmd_mesh, opt_spec))
    shardings = jax.tree.map(lambda v: v.sharding, g_state)
    g_batch = jax.tree.map(
        lambda v: jax.device_put(v, NamedSharding(gspmd_mesh, batch_spec)), batch
    )
    single_graph = nnx.split(unconstrained(plain))[0]
    return {
        "gspmd": Candidate(optax_step(graphdef, tx, mse, shardings), g_state, g_batch, gspmd_mesh),
        "unsharded": Candidate(
            optax_step(single_graph, tx, mse),
            on_device((params, opt_state), devices[0]),
            on_device(batch, devices[0]),
        ),
    }


def specs_of(model) -> Callable[[str], Any]:
    """`spec_of(path)` giving, for a plain twin of `model`, the PartitionSpec of `model`'s
    parameter at the same path; optimizer state leaves (`...mu['up']['kernel']...`) get the
    spec of the parameter their path ends with. GSPMD then starts from exactly the layout
    shardlax uses, and only the collectives are XLA's choice."""
    _, state = nnx.split(model)
    specs = {
        jax.tree_util.keystr(path): v.sharding.spec
        for path, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }

    def spec_of(path: str):
        for p, spec in specs.items():
            if path.endswith(p):
                return spec
        return P()

    return spec_of


def module_candidate(model, batch, mesh) -> Candidate:
    """A shardlax model (its layers place themselves) trained with Adam on MSE."""

    graphdef, params = nnx.split(model)
    tx = adam()
    return Candidate(optax_step(graphdef, tx, mse), (params, tx.init(params)), batch, mesh)


# ----------------------------------------------------------------------------- models


class PlainMLP(nnx.Module):
    """`down(gelu(up(x)))` of two `nnx.Linear`: the model of the MLP rows.

    `constrain = (pin_hidden, pin_output)` pins the activations (GSPMD twin).
    """

    def __init__(self, d: int, f: int, rngs: nnx.Rngs, constrain=None):
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)
        self.constrain = constrain

    def __call__(self, x):
        hidden, out = self.constrain or (None, None)
        return _pin(out, self.down(_pin(hidden, jax.nn.gelu(self.up(x)))))


class ParallelMLP(nnx.Module):
    """The same MLP from shardlax's column- and row-parallel linears."""

    def __init__(self, d: int, f: int, rngs: nnx.Rngs, mesh, **kwargs):
        self.up = shardlax.nn.ColumnParallelLinear(d, f, rngs=rngs, mesh=mesh, **kwargs)
        self.down = shardlax.nn.RowParallelLinear(f, d, rngs=rngs, mesh=mesh, **kwargs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def regression_batch(b: int, d: int):
    kx, ky = jax.random.split(jax.random.key(1))
    return (jax.random.normal(kx, (b, d)), jax.random.normal(ky, (b, d)))


def mlp_param_bytes(d: int, f: int) -> int:
    return (d * f + f + f * d + d) * 4


class Scanned(nnx.Module):
    """`L` residual layers `x + gelu(layer_l(x))`, parameters stacked and run by `lax.scan`.

    `make_layer(rngs)` builds one layer (an `nnx.Linear` or a shardlax linear);
    the stacked parameters keep each layer's layout on a new leading dim
    (`P(None, *spec)`), and each step of the scan gets one layer's slice. With
    `remat`, each layer is recomputed in the backward (`jax.checkpoint`).
    """

    def __init__(
        self, make_layer: Callable, layers: int, rngs: nnx.Rngs, remat: bool = True,
        constrain: Callable | None = None,
    ):  # fmt: skip
        self.constrain = constrain
        graphdef, *_ = nnx.split(make_layer(nnx.Rngs(0)))
        states = [nnx.state(make_layer(rngs)) for _ in range(layers)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        for _, var in nnx.to_flat_state(stacked):
            sharding = getattr(states[0], "sharding", None)
            del sharding
            meta = var.get_metadata()
            if "out_sharding" in meta and meta.get("mesh") is not None:
                spec = P(None, *meta["out_sharding"])
                var.set_metadata("out_sharding", spec)
                var.set_value(jax.device_put(var.get_value(), NamedSharding(meta["mesh"], spec)))
        self.layers = nnx.merge(graphdef, stacked)
        self.remat = remat

    def __call__(self, x):
        graphdef, state = nnx.split(self.layers)

        pin = self.constrain

        def layer(x, layer_state):
            x = _pin(pin, x)
            return _pin(pin, x + jax.nn.gelu(nnx.merge(graphdef, layer_state)(x))), None

        if self.remat:
            layer = jax.checkpoint(layer)
        x, _ = jax.lax.scan(layer, x, state)
        return x


class ResidualLinear(nnx.Module):
    """`x + gelu(x W + b)`: one layer of the deep FSDP rows."""

    def __init__(self, d: int, kernel_init, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, d, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x):
        return x + jax.nn.gelu(self.linear(x))


class PlainStack(nnx.Module):
    """`make_layer` stacked `L` times by flax's scan-over-layers pattern
    (`nnx.split_rngs` + `nnx.vmap`), run by `lax.scan`, each layer under
    `jax.checkpoint` with `remat`."""

    def __init__(
        self, make_layer: Callable, layers: int, rngs: nnx.Rngs, remat: bool = True,
        constrain: Callable | None = None,
    ):  # fmt: skip
        self.constrain = constrain

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return make_layer(rngs)

        self.layers = create(rngs)
        self.remat = remat

    def __call__(self, x):
        graphdef, state = nnx.split(self.layers)

        pin = self.constrain

        def layer(x, layer_state):
            return _pin(pin, nnx.merge(graphdef, layer_state)(_pin(pin, x))), None

        if self.remat:
            layer = jax.checkpoint(layer)
        x, _ = jax.lax.scan(layer, x, state)
        return x


def plain_tinylm_loss(cfg, params: dict, tokens, targets, constrain: Callable | None = None):
    """TinyLM's loss in plain jnp on its parameter dict, no shard_map, no collectives.

    One copy of that math, shared with `shardlax.plan`: `shardlax._gspmd.tinylm_loss`.
    `constrain` pins the residual stream [B, S, D] (the constrained GSPMD twin).
    """
    from shardlax._gspmd import tinylm_loss

    return tinylm_loss(cfg, params, tokens, targets, constrain=constrain)


def dict_step(loss_fn: Callable, tx, out_shardings=None) -> Callable:
    """Jitted Adam step on a plain parameter dict: `((params, opt), batch) -> (state, loss)`."""

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    if out_shardings is not None:
        return jax.jit(step, donate_argnums=0, out_shardings=(out_shardings, None))
    return jax.jit(step, donate_argnums=0)
