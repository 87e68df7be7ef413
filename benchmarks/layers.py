"""Per-layer / per-train-step benchmark: shardlax (shard_map) vs GSPMD vs one device.

Each row is one training step (loss, gradients, optimizer update) of one
parallel strategy, built three ways:

  shardlax   the shardlax layers / strategy (`jax.shard_map`, every collective
             written by hand), on an Explicit mesh;
  gspmd      the same math written with plain `nnx.Linear` / `jnp`, jitted with
             its parameters and batch placed by `NamedSharding` on an Auto mesh,
             so XLA's sharding propagation (GSPMD) chooses the collectives;
  unsharded  the same plain model on one device.

The three start from the same parameter values (same `nnx.Rngs`) and inputs;
the losses they return are recorded to show they compute the same thing.
For each the script records trace+lower and compile time, the collectives of
the compiled HLO (`shardlax.audit`: count, kinds, bytes per device), the
per-device memory of `memory_analysis()` (arguments, temp), and step times
from interleaved runs (shardlax, gspmd, unsharded, shardlax, ...). Ratios
are of medians; the spread of a ratio is the p10-p90 of the per-round ratios
(each round times the three back to back).

Theoretical minimum collectives per step (per device; n = devices on the
axis, B = local tokens, D = model width, F = hidden width, L = layers,
P = parameter bytes of the whole model, f32):

  tp_mlp      column -> row MLP, n-way tensor parallel, input not differentiated:
              forward 1 all-reduce of the activation [B, D] over 'model';
              backward none (dx of the column layer is not needed, dW is local).
  fsdp_deep   L scanned residual layers [D, D], fully sharded over 'fsdp',
              gathered on use and freed after the forward: per layer 2
              all-gathers of W (forward, and again in the backward for dx),
              1 of b, 1 reduce-scatter of each gradient; plus 1 scalar
              all-reduce of the loss. `fsdp_deep_remat` is the same model
              with each layer under `jax.checkpoint` (same minimum: the
              recomputed forward could reuse the backward's gather);
              `fully_shard_deep` makes each `nnx.Linear` an FSDP unit with
              `shardlax.fully_shard` instead of the layers' `fsdp_axis`.
  zero2       data-parallel MLP with Adam, gradients and optimizer state
              sharded over 'data' (ZeRO-2): 1 reduce-scatter of the gradients
              (P bytes) + 1 all-gather of the updated parameters (P bytes).
  fsdp_tp     column -> row MLP on a (fsdp=f, model=m) mesh, parameters gathered
              over 'fsdp' on use and freed after the forward: per parameter
              1 all-gather of its 1/m model shard in the forward, 1 more in
              the backward where the input gradient needs it (down.W only:
              the first layer's input is data), 1 reduce-scatter of its
              gradient; plus 1 all-reduce over 'model' of the activation
              [B/f, D] (forward) and 1 scalar all-reduce of the loss.
  tinylm      TinyLM train step: per block the attention and MLP row layers'
              activation all-reduces (forward), the column layers' input
              gradient all-reduces (backward), and the gradient reduction
              over the batch axes.

A collective inside a `lax.scan` appears once in the HLO; the "executed"
bytes multiply it by the row's loop trip count.

Run:
    python benchmarks/layers.py                  # every row that exists, 4 devices
    python benchmarks/layers.py --rows tp_mlp --devices 8 --repeats 30
    python benchmarks/layers.py --quick          # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _common as C
import shardlax
from shardlax import audit

# ----------------------------------------------------------------------------- config
DEVICES = (2, 4, 8)
REPEATS = 30
WARMUP = 2
LR = 1e-2
SIZES = {  # default, --quick
    "tp_mlp": (dict(batch=256, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "fsdp_deep": (dict(batch=64, d=512, layers=8, remat=0), dict(batch=8, d=32, layers=2, remat=0)),
    "fsdp_deep_remat": (
        dict(batch=64, d=512, layers=8, remat=1),
        dict(batch=8, d=32, layers=2, remat=1),
    ),
    "fully_shard_deep": (
        dict(batch=64, d=512, layers=8, remat=0, fully_shard=1),
        dict(batch=8, d=32, layers=2, remat=0, fully_shard=1),
    ),
    "zero2": (dict(batch=256, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "fsdp_tp": (dict(batch=128, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "tinylm": (
        dict(batch=8, seq=64, vocab=512, d=128, layers=4, heads=4, f=512),
        dict(batch=4, seq=8, vocab=64, d=32, layers=2, heads=4, f=64),
    ),
}
IMPLS = ("shardlax", "gspmd", "unsharded")
# -----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------- helpers


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
    return {
        "gspmd": Candidate(optax_step(graphdef, tx, mse, shardings), g_state, g_batch, gspmd_mesh),
        "unsharded": Candidate(
            optax_step(graphdef, tx, mse),
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
        # `shardlax.fully_shard` keeps the wrapped module under `.module`.
        jax.tree_util.keystr(path).replace("['module']", ""): v.sharding.spec
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


# ----------------------------------------------------------------------------- rows


class PlainMLP(nnx.Module):
    """`down(gelu(up(x)))` of two `nnx.Linear`: the model of the MLP rows."""

    def __init__(self, d: int, f: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


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


def row_tp_mlp(cfg: dict, n: int, devices) -> Row:
    """Column -> row MLP, n-way tensor parallel over 'model' (batch replicated)."""
    b, d, f = cfg["batch"], cfg["d"], cfg["f"]
    mesh = shardlax.make_mesh(model=n, devices=devices)
    auto = shardlax.make_mesh(model=n, devices=devices, axis_types="auto")
    batch = regression_batch(b, d)

    def spec_of(path: str):
        if "up" in path:
            return P(None, "model") if "kernel" in path else P("model")
        return P("model", None) if "kernel" in path else P()

    cands = {"shardlax": module_candidate(ParallelMLP(d, f, nnx.Rngs(0), mesh), batch, mesh)}
    cands |= plain_candidates(PlainMLP(d, f, nnx.Rngs(0)), batch, auto, spec_of, P(), devices)
    return Row(
        name="tp_mlp",
        strategy="tensor parallel (Megatron column -> row)",
        mesh=f"model={n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=[
            minimum("all-reduce", ["model"], b * d * 4, n, 1, "forward: partial products [B, D]")
        ],
    )


def row_zero2(cfg: dict, n: int, devices) -> Row:
    """Data-parallel MLP with Adam; gradients and optimizer state split over 'data'."""
    try:
        from shardlax.train import Trainer
    except ImportError as e:
        raise Skip(f"shardlax.train is not available ({e})") from e
    b, d, f = cfg["batch"], cfg["d"], cfg["f"]
    mesh = shardlax.make_mesh(data=n, devices=devices)
    auto = shardlax.make_mesh(data=n, devices=devices, axis_types="auto")
    batch = regression_batch(b, d)
    trainer = Trainer(PlainMLP(d, f, nnx.Rngs(0)), adam(), mse, mesh=mesh, strategy="zero2")
    cands = {"shardlax": Candidate(trainer.step, trainer.init(), batch, mesh)}

    def opt_spec(path: str):
        # Adam's moments split on their first dim (ZeRO-2 under GSPMD); the count replicated.
        if ".mu" in path or ".nu" in path:
            return P("data", None) if "kernel" in path else P("data")
        return P()

    cands |= plain_candidates(
        PlainMLP(d, f, nnx.Rngs(0)), batch, auto, lambda _: P(), P("data"), devices, opt_spec
    )
    p_bytes = mlp_param_bytes(d, f)
    return Row(
        name="zero2",
        strategy="ZeRO-2 (data parallel, sharded gradients and Adam state)",
        mesh=f"data={n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=[
            minimum("reduce-scatter", ["data"], p_bytes, n, 1, "gradients, every byte once"),
            minimum("all-gather", ["data"], p_bytes, n, 1, "updated parameters, every byte once"),
            minimum("all-reduce", ["data"], 4, n, 1, "the loss, for logging"),
        ],
    )


class Scanned(nnx.Module):
    """`L` residual layers `x + gelu(layer_l(x))`, parameters stacked and run by `lax.scan`.

    `make_layer(rngs)` builds one layer (an `nnx.Linear` or a shardlax linear);
    the stacked parameters keep each layer's layout on a new leading dim
    (`P(None, *spec)`), and each step of the scan gets one layer's slice. With
    `remat`, each layer is recomputed in the backward (`jax.checkpoint`).
    """

    def __init__(self, make_layer: Callable, layers: int, rngs: nnx.Rngs, remat: bool = True):
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

        def layer(x, layer_state):
            return x + jax.nn.gelu(nnx.merge(graphdef, layer_state)(x)), None

        if self.remat:
            layer = jax.checkpoint(layer)
        x, _ = jax.lax.scan(layer, x, state)
        return x


def row_fsdp_deep(cfg: dict, n: int, devices) -> Row:
    """L scanned [D, D] layers under remat, fully sharded over 'fsdp' (ZeRO-3)."""
    b, d, layers = cfg["batch"], cfg["d"], cfg["layers"]
    init = nnx.initializers.normal(0.02)  # keeps the residual stream O(1) over many layers
    mesh = shardlax.make_mesh(fsdp=n, devices=devices)
    auto = shardlax.make_mesh(fsdp=n, devices=devices, axis_types="auto")

    def fsdp_linear(rngs):
        # A column-parallel linear on a mesh whose model axis has size 1 is an FSDP linear.
        return shardlax.nn.ColumnParallelLinear(
            d, d, kernel_init=init, rngs=rngs, mesh=mesh, fsdp_axis="fsdp"
        )

    def fully_sharded_linear(rngs):
        # Any NNX module made an FSDP unit by shardlax.fully_shard (FSDP2's API).
        return shardlax.fully_shard(nnx.Linear(d, d, kernel_init=init, rngs=rngs), mesh=mesh)

    unit = fully_sharded_linear if cfg.get("fully_shard") else fsdp_linear
    try:
        sharded = Scanned(unit, layers, nnx.Rngs(0), remat=bool(cfg["remat"]))
    except (TypeError, AttributeError) as e:
        raise Skip(f"shardlax has no FSDP linear of this kind yet ({e})") from e
    plain = Scanned(
        lambda rngs: nnx.Linear(d, d, kernel_init=init, rngs=rngs),
        layers,
        nnx.Rngs(0),
        remat=bool(cfg["remat"]),
    )
    x, y = regression_batch(b, d)
    spec = P("fsdp")
    batch = tuple(jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, y))
    cands = {"shardlax": module_candidate(sharded, batch, mesh)}
    cands |= plain_candidates(plain, (x, y), auto, specs_of(sharded), spec, devices)
    fs = ["fsdp"]
    return Row(
        name=("fully_shard_deep" if cfg.get("fully_shard") else "fsdp_deep")
        + ("_remat" if cfg["remat"] else ""),
        strategy=f"FSDP / ZeRO-3, {layers} layers in lax.scan"
        + (" (shardlax.fully_shard(nnx.Linear))" if cfg.get("fully_shard") else "")
        + (", each under jax.checkpoint" if cfg["remat"] else ""),
        mesh=f"fsdp={n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=[
            minimum("all-gather", fs, d * d * 4, n, 2 * layers, "W per layer: forward + backward"),
            minimum("all-gather", fs, d * 4, n, layers, "b per layer: forward"),
            minimum("reduce-scatter", fs, d * d * 4, n, layers, "dW per layer"),
            minimum("reduce-scatter", fs, d * 4, n, layers, "db per layer"),
            minimum("all-reduce", fs, 4, n, 1, "the mean loss"),
        ],
        loop_trips=layers,
    )


def row_fsdp_tp(cfg: dict, n: int, devices) -> Row:
    """Column -> row MLP on a (fsdp, model) mesh: FSDP over 'fsdp' composed with TP."""
    b, d, f = cfg["batch"], cfg["d"], cfg["f"]
    model_n = n // 2 if n >= 4 else 1
    fsdp_n = n // model_n
    mesh = shardlax.make_mesh(fsdp=fsdp_n, model=model_n, devices=devices)
    auto = shardlax.make_mesh(fsdp=fsdp_n, model=model_n, devices=devices, axis_types="auto")
    try:
        sharded = ParallelMLP(d, f, nnx.Rngs(0), mesh, fsdp_axis="fsdp")
    except TypeError as e:
        raise Skip(f"the tensor-parallel layers take no fsdp_axis yet ({e})") from e
    x_spec = sharded.up.input_spec(2)
    x, y = regression_batch(b, d)
    batch = (
        jax.device_put(x, NamedSharding(mesh, x_spec)),
        jax.device_put(y, NamedSharding(mesh, sharded.down.output_spec(2))),
    )
    cands = {"shardlax": module_candidate(sharded, batch, mesh)}
    cands |= plain_candidates(
        PlainMLP(d, f, nnx.Rngs(0)), (x, y), auto, specs_of(sharded), P("fsdp"), devices
    )
    m = model_n
    fs = ["fsdp"]
    return Row(
        name="fsdp_tp",
        strategy="FSDP (reshard after forward) x tensor parallel",
        mesh=f"fsdp={fsdp_n},model={model_n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=[
            minimum("all-gather", fs, d * f // m * 4, fsdp_n, 1, "up.W, forward"),
            minimum("all-gather", fs, f // m * 4, fsdp_n, 1, "up.b, forward"),
            minimum("all-gather", fs, f // m * d * 4, fsdp_n, 2, "down.W, forward + backward (dh)"),
            minimum("all-gather", fs, d * 4, fsdp_n, 1, "down.b, forward"),
            minimum("reduce-scatter", fs, d * f // m * 4, fsdp_n, 2, "dW of up and down"),
            minimum("reduce-scatter", fs, f // m * 4, fsdp_n, 1, "db of up"),
            minimum("reduce-scatter", fs, d * 4, fsdp_n, 1, "db of down"),
            minimum("all-reduce", ["model"], b // fsdp_n * d * 4, m, 1, "TP: partial products"),
            minimum("all-reduce", fs, 4, fsdp_n, 1, "the mean loss"),
        ],
    )


def plain_tinylm_loss(cfg, params: dict, tokens, targets):
    """TinyLM's loss in plain jnp on its parameter dict, no shard_map, no collectives.

    The math of `shardlax.models.TinyLM` (pre-norm blocks of RoPE attention and
    an MLP in a `lax.scan`, tied embedding head, padded vocabulary masked out
    of the softmax). It borrows only collective-free math from
    `shardlax.kernels` (RMSNorm, RoPE, causal attention) so that the twins
    compute the same function; sharding it is left to GSPMD.
    """
    from shardlax import kernels as K

    def lin(x, layer):
        y = x @ layer["kernel"]
        return y + layer["bias"] if "bias" in layer else y

    table = params["embed"]["embedding"]  # [V_pad, D]
    x = jnp.take(table, tokens, axis=0)  # [B, S, D]
    b, s, _ = x.shape
    hd = cfg.d_model // cfg.n_heads

    def block(x, p):
        h = K.rms_norm(x, p["attn_norm"]["scale"])
        a = p["attn"]
        q = K.rotary_embedding(lin(h, a["q_proj"]).reshape(b, s, -1, hd), theta=cfg.rope_theta)
        k = K.rotary_embedding(lin(h, a["k_proj"]).reshape(b, s, -1, hd), theta=cfg.rope_theta)
        v = lin(h, a["v_proj"]).reshape(b, s, -1, hd)
        o = K.dot_product_attention(q, k, v).reshape(b, s, -1)
        x = x + lin(o, a["o_proj"])
        h = K.rms_norm(x, p["mlp_norm"]["scale"])
        m = p["mlp"]
        if cfg.activation == "swiglu":
            h = jax.nn.silu(lin(h, m["gate"])) * lin(h, m["up"])
        else:
            h = jax.nn.gelu(lin(h, m["up"]))
        return x + lin(h, m["down"]), None

    if cfg.remat:
        block = jax.checkpoint(block)
    x, _ = jax.lax.scan(block, x, params["blocks"])
    x = K.rms_norm(x, params["final_norm"]["scale"])
    head = table.T if cfg.tie_embeddings else params["head"]["kernel"]  # [D, V_pad]
    logits = x @ head
    logits = jnp.where(jnp.arange(logits.shape[-1]) < cfg.vocab, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


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


def row_tinylm(cfg: dict, n: int, devices) -> Row:
    """TinyLM train step on a (fsdp, model) mesh: FSDP x tensor parallel transformer."""
    try:
        from shardlax.models import TinyLM, TinyLMConfig
    except ImportError as e:
        raise Skip(f"shardlax.models.TinyLM is not available ({e})") from e
    model_n = n // 2 if n >= 4 else 1
    fsdp_n = n // model_n
    mesh = shardlax.make_mesh(fsdp=fsdp_n, model=model_n, devices=devices)
    auto = shardlax.make_mesh(fsdp=fsdp_n, model=model_n, devices=devices, axis_types="auto")
    b, seq = cfg["batch"], cfg["seq"]
    lm_cfg = TinyLMConfig(
        vocab=cfg["vocab"], d_model=cfg["d"], n_layers=cfg["layers"], n_heads=cfg["heads"],
        d_ff=cfg["f"], seq_len=seq,
    )  # fmt: skip
    model = TinyLM(lm_cfg, mesh=mesh, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (b, seq + 1), 0, lm_cfg.vocab)
    tokens, targets = ids[:, :-1], ids[:, 1:]
    batch_spec = P("fsdp")
    batch = tuple(jax.device_put(v, NamedSharding(mesh, batch_spec)) for v in (tokens, targets))
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(rest):
        raise Skip("TinyLM has non-parameter state; this row trains parameters only")

    def lm_loss(model, batch):
        return model.loss(*batch)

    tx = adam()
    cands = {
        "shardlax": Candidate(
            optax_step(graphdef, tx, lm_loss), (params, tx.init(params)), batch, mesh
        )
    }
    pure = nnx.to_pure_dict(params)
    spec_of = specs_of(model)

    def loss_fn(p, tokens, targets):
        return plain_tinylm_loss(lm_cfg, p, tokens, targets)

    host = jax.tree.map(np.asarray, pure)
    g_params = place(host, auto, lambda path: spec_of(path + ".value"))
    g_opt = place(tx.init(host), auto, lambda path: spec_of(path + ".value"))
    g_state = (g_params, g_opt)
    shardings = jax.tree.map(lambda v: v.sharding, g_state)
    g_batch = tuple(jax.device_put(v, NamedSharding(auto, batch_spec)) for v in (tokens, targets))
    cands["gspmd"] = Candidate(dict_step(loss_fn, tx, shardings), g_state, g_batch, auto)
    cands["unsharded"] = Candidate(
        dict_step(loss_fn, tx),
        on_device((host, tx.init(host)), devices[0]),
        on_device((tokens, targets), devices[0]),
    )
    # Reference: the collectives TinyLM declares for one step, blocks counted per layer.
    declared = model.declared_collectives((b, seq), grad=True)
    bgraph, bstate = nnx.split(model.blocks)
    with jax.set_mesh(mesh):
        one = nnx.merge(bgraph, jax.tree.map(lambda a: a[0], bstate))
    per_block = one.declared_collectives((b, seq, lm_cfg.d_model), grad=True)
    mins = [
        minimum(dc.kind, dc.axes, (dc.bytes or 0) // max(dc.count, 1),
                math.prod(mesh.shape[a] for a in dc.axes), dc.count, dc.why)
        for dc in declared
    ]  # fmt: skip
    for dc in per_block:  # listed once by TinyLM; they run once per layer
        for m in mins:
            if m["why"] == dc.why and m["kind"] == dc.kind and m["count"] == dc.count:
                m["count"] *= lm_cfg.n_layers
                m["why"] += f" (x{lm_cfg.n_layers} layers)"
                break
    return Row(
        name="tinylm",
        strategy="TinyLM: FSDP x tensor parallel transformer, scanned blocks",
        mesh=f"fsdp={fsdp_n},model={model_n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=mins,
        loop_trips=lm_cfg.n_layers,
        reference="declared",
    )


ROWS: dict[str, Callable[..., Row]] = {
    "tp_mlp": row_tp_mlp,
    "fsdp_deep": row_fsdp_deep,
    "fsdp_deep_remat": row_fsdp_deep,
    "fully_shard_deep": row_fsdp_deep,
    "zero2": row_zero2,
    "fsdp_tp": row_fsdp_tp,
    "tinylm": row_tinylm,
}


# ----------------------------------------------------------------------------- measure


class Runner:
    """Calls a compiled step, carrying its (donated) state into the next call."""

    def __init__(self, compiled, state, batch):

        # Fresh buffers: optax may share one zeros buffer between state leaves,
        # which donation cannot take twice.
        self.state = jax.tree.map(jnp.copy, state)
        self.compiled, self.batch = compiled, batch

    def __call__(self):
        self.state, out = self.compiled(self.state, self.batch)
        return out

    @staticmethod
    def loss(out):
        return out["loss"] if isinstance(out, dict) else out


def compile_timed(fn, args):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def collectives_summary(report, loop_trips: int) -> dict:
    trips = [loop_trips if c.in_loop else 1 for c in report]
    kinds: dict[str, int] = {}
    for c, t in zip(report, trips, strict=True):
        kinds[c.kind] = kinds.get(c.kind, 0) + c.operands * t
    return {
        "hlo_ops": len(report),
        "tensors": sum(c.operands * t for c, t in zip(report, trips, strict=True)),
        "hlo_tensors": sum(c.operands for c in report),
        "kinds": kinds,
        "bytes": sum(c.bytes for c in report),
        "wire_bytes": sum(c.wire_bytes for c in report),
        "executed_bytes": sum(c.bytes * t for c, t in zip(report, trips, strict=True)),
        "executed_wire_bytes": sum(c.wire_bytes * t for c, t in zip(report, trips, strict=True)),
        "list": [
            {"kind": c.kind, "axes": list(c.axes), "dtype": c.dtype, "bytes": c.bytes,
             "operands": c.operands, "in_loop": c.in_loop}
            for c in report
        ],
    }  # fmt: skip


def measure(row: Row, args) -> list[dict]:
    info = C.machine_info()
    meta, runners, hlo = {}, {}, {}
    for impl, cand in row.candidates.items():
        c, t_lower, t_compile = compile_timed(cand.fn, (cand.state, cand.batch))
        mem = c.memory_analysis()
        # Tuple types of 5+ elements carry `/*index=5*/` comments, which hide loop
        # bodies from shardlax.audit (their header line then looks like an instruction).
        report = audit.parse_hlo(re.sub(r"/\*index=\d+\*/", "", c.as_text()), cand.mesh)
        runners[impl] = Runner(c, cand.state, cand.batch)
        loss = float(jax.device_get(runners[impl].loss(runners[impl]())))
        meta[impl] = {
            "lower_s": t_lower,
            "compile_s": t_compile,
            "memory": {
                "arguments": int(mem.argument_size_in_bytes),
                "outputs": int(mem.output_size_in_bytes),
                "temp": int(mem.temp_size_in_bytes),
                "alias": int(mem.alias_size_in_bytes),
            },
            "collectives": collectives_summary(report, row.loop_trips),
            "loss": loss,
        }
        hlo[impl] = C.hlo_instructions(c.as_text())
    times = C.interleaved(runners, args.repeats, args.warmup)
    mins = row.minimum
    min_bytes = sum(m["bytes"] * m["count"] for m in mins)
    min_wire = sum(m["wire_bytes"] * m["count"] for m in mins)
    rows = []
    for impl in row.candidates:
        st = C.summarize(times[impl])
        r = {
            "bench": "layers",
            "row": row.name,
            "devices": row.config["n"],
            "strategy": row.strategy,
            "impl": impl,
            "mesh": row.mesh if impl != "unsharded" else "1 device",
            "config": row.config,
            **st,
            "spread": (st["p90_s"] - st["p10_s"]) / st["median_s"],
            **meta[impl],
            "minimum": mins,
            "minimum_tensors": sum(m["count"] for m in mins),
            "reference": row.reference,
            "minimum_bytes": min_bytes,
            "minimum_wire_bytes": min_wire,
            "loop_trips": row.loop_trips,
            "process": f"one process, {info['device_count']} simulated devices",
            "note": C.SIMULATED_NOTE,
            "machine": info,
        }
        for other in ("gspmd", "unsharded"):
            if impl == "shardlax" and other in times:
                per_round = [a / b for a, b in zip(times["shardlax"], times[other], strict=True)]
                # The median of per-round ratios: each round times the candidates back
                # to back, so slow drift of the machine cancels within a round.
                r[f"ratio_vs_{other}"] = statistics.median(per_round)
                r[f"ratio_of_medians_vs_{other}"] = st["median_s"] / statistics.median(times[other])
                r[f"ratio_vs_{other}_p10"] = C.percentile(per_round, 10)
                r[f"ratio_vs_{other}_p90"] = C.percentile(per_round, 90)
                c_self = meta["shardlax"]["lower_s"] + meta["shardlax"]["compile_s"]
                c_other = meta[other]["lower_s"] + meta[other]["compile_s"]
                r[f"compile_ratio_vs_{other}"] = c_self / c_other
        if impl == "shardlax" and "gspmd" in hlo:
            # Few differing instructions: the two programs are the same computation,
            # and a time difference is dispatch or noise.
            r["hlo_instructions"] = len(hlo["shardlax"])
            r["hlo_differing_vs_gspmd"] = C.hlo_difference(hlo["shardlax"], hlo["gspmd"])
        rows.append(r)
        col = r["collectives"]
        print(
            f"{row.name:10s} n={row.config['n']} {impl:9s} median {C.fmt_time(r['median_s']):>9s} "
            f"spread {r['spread']:4.2f} compile {r['lower_s'] + r['compile_s']:.2f}s "
            f"collectives {col['tensors']} {col['kinds']} {C.fmt_bytes(col['executed_bytes'])} "
            f"(min {C.fmt_bytes(min_bytes)}) temp {C.fmt_bytes(r['memory']['temp'])} "
            f"loss {r['loss']:.6f}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- outputs


def _kinds(k: dict) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
             "all-to-all": "A2A", "collective-permute": "CP"}  # fmt: skip
    return " ".join(f"{v} {short.get(kind, kind)}" for kind, v in sorted(k.items())) or "none"


def _ratio(r: dict, key: str) -> str:
    if key not in r:
        return "-"
    if f"{key}_p10" in r:
        return f"{r[key]:.2f} ({r[key + '_p10']:.2f}-{r[key + '_p90']:.2f})"
    return f"{r[key]:.2f}"


def _min_kinds(mins: list[dict]) -> dict:
    out: dict[str, int] = {}
    for m in mins:
        out[m["kind"]] = out.get(m["kind"], 0) + m["count"]
    return out


def markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    info = rows[0]["machine"] if rows else C.machine_info()
    out = [
        "# Layers and train steps: shardlax vs GSPMD vs one device",
        "",
        f"Machine: {C.machine_line(info)}. {C.SIMULATED_NOTE}",
        "",
        "Each row is one Adam train step (loss, gradients, update; state donated and carried). "
        "Times are medians of interleaved runs (shardlax, gspmd, unsharded, shardlax, ...); "
        "a step-time ratio is the median of the per-round ratios (each round runs the three "
        "back to back), with their p10-p90 after it. Compile = trace + "
        "lower + compile. Collectives are read from the compiled HLO: tensors moved per step "
        "(AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all), S = bytes per "
        "device (nccl-tests size), wire = bytes each device sends with ring algorithms "
        "(all-reduce 2S(n-1)/n, others S(n-1)/n), collectives inside a scan counted once per "
        "iteration; `minimum` is the least the strategy needs (see the module docstring). "
        "Memory is `memory_analysis()` per device. The last column counts the compiled "
        "instructions of the shardlax program with no identical instruction in the GSPMD "
        "program (names and source metadata ignored): a handful means the same program.",
        "",
        "## Ratios",
        "",
    ]
    by = {(r["row"], r["devices"], r["impl"]): r for r in rows}
    order = list(dict.fromkeys(r["row"] for r in rows))
    keys = sorted(
        dict.fromkeys((r["row"], r["devices"]) for r in rows),
        key=lambda k: (order.index(k[0]), k[1]),
    )
    ratio_rows = []
    for name, n in keys:
        s, g, u = (by.get((name, n, i)) for i in IMPLS)
        if not s:
            continue
        ratio_rows.append([
            f"{name} ({s['mesh']})",
            _ratio(s, "ratio_vs_gspmd"), _ratio(s, "ratio_vs_unsharded"),
            _ratio(s, "compile_ratio_vs_gspmd"), _ratio(s, "compile_ratio_vs_unsharded"),
            f"{C.fmt_bytes(s['collectives']['executed_wire_bytes'])} / "
            f"{C.fmt_bytes(g['collectives']['executed_wire_bytes']) if g else '-'} / "
            f"{C.fmt_bytes(s['minimum_wire_bytes'])}",
            " / ".join(C.fmt_bytes(r["memory"]["temp"]) if r else "-" for r in (s, g, u)),
            f"{s.get('hlo_differing_vs_gspmd', '-')} of {s.get('hlo_instructions', '-')}",
        ])  # fmt: skip
    out.append(C.md_table(
        ["row (mesh)", "step shardlax/GSPMD", "step shardlax/unsharded",
         "compile shardlax/GSPMD", "compile shardlax/unsharded",
         "wire bytes/device shardlax / GSPMD / min", "temp/device shardlax / GSPMD / unsharded",
         "HLO instructions differing from GSPMD"],
        ratio_rows,
    ))  # fmt: skip
    out += ["", "## Every candidate", ""]
    full = []
    for name, n in keys:
        for impl in IMPLS:
            r = by.get((name, n, impl))
            if not r:
                continue
            col = r["collectives"]
            full.append([
                name, impl, r["mesh"], C.fmt_time(r["median_s"]),
                f"{C.fmt_time(r['p10_s'])}-{C.fmt_time(r['p90_s'])}",
                f"{r['lower_s'] + r['compile_s']:.2f} s",
                f"{col['tensors']} ({_kinds(col['kinds'])})",
                C.fmt_bytes(col["executed_bytes"]), C.fmt_bytes(col["executed_wire_bytes"]),
                C.fmt_bytes(r["memory"]["arguments"]), C.fmt_bytes(r["memory"]["temp"]),
                f"{r['loss']:.6g}",
            ])  # fmt: skip
        s = by.get((name, n, "shardlax"))
        if s:
            mins = s["minimum"]
            full.append([
                name, f"*{s['reference']}*", "", "", "", "",
                f"{s['minimum_tensors']} ({_kinds(_min_kinds(mins))})",
                C.fmt_bytes(s["minimum_bytes"]), C.fmt_bytes(s["minimum_wire_bytes"]),
                "", "", "",
            ])  # fmt: skip
    out.append(C.md_table(
        ["row", "impl", "mesh", "step median", "p10-p90", "compile", "collectives / step",
         "S bytes/device", "wire bytes/device", "args/device", "temp/device", "loss"],
        full,
        align="lllrrrrrrrrr",
    ))  # fmt: skip
    out += [
        "",
        "## Theoretical minimum per row",
        "",
        "(tinylm: the collectives `TinyLM.declared_collectives` lists for one step, blocks "
        "counted once per layer: the design's own count, which GSPMD may undercut.)",
        "",
    ]
    for name, n in keys:
        r = by.get((name, n, "shardlax"))
        if r:
            items = "; ".join(
                f"{m['count']} x {m['kind']} over {','.join(m['axes'])} of "
                f"{C.fmt_bytes(m['bytes'])} ({m['why']})"
                for m in r["minimum"]
            )
            out.append(f"- **{name}** ({r['strategy']}; {r['config']}): {items}")
    if skipped:
        out += ["", "## Rows not run", ""]
        out += [f"- **{k}**: {v}" for k, v in skipped.items()]
    return "\n".join(out) + "\n"


def _bars(ax, labels, series, title, ylabel, log=False):
    """Grouped bars, one group per label: `series` is [(legend, values, errors, style)]."""
    width = 0.84 / len(series)
    for i, (legend, ys, err, style) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, ys, width, label=legend, yerr=err, capsize=2 if err else 0,
                      error_kw={"lw": 0.8}, **style)  # fmt: skip
        if len(series) <= 3:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", lw=1)
    if log:
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib_ticker().FormatStrFormatter("%g"))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["row"], r["devices"], r["impl"]): r for r in rows}
    devices = sorted({r["devices"] for r in rows})
    order = [
        name for name in dict.fromkeys(r["row"] for r in rows)
        if any(all((name, n, i) in by for i in IMPLS) for n in devices)
    ]  # fmt: skip
    if not order:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [name.replace("_", "\n", 1) for name in order]
    nan = float("nan")

    def get(name, n, impl, fn):
        r = by.get((name, n, impl))
        return fn(r) if r is not None and (name, n, "shardlax") in by else nan

    def ratio_series(key):
        out = []
        for j, n in enumerate(devices):
            ys = [get(name, n, "shardlax", lambda r: r[key]) for name in order]
            lo = [get(name, n, "shardlax", lambda r: r[key] - r[key + "_p10"]) for name in order]
            hi = [get(name, n, "shardlax", lambda r: r[key + "_p90"] - r[key]) for name in order]
            err = [[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]]
            out.append((f"{n} devices", ys, err, {"color": colors[j]}))
        return out

    def per_impl(fn):
        out = []
        for j, n in enumerate(devices):
            for impl, hatch in (("shardlax", None), ("gspmd", "//")):
                ys = [
                    get(name, n, impl, lambda r, name=name, n=n: fn(r, name, n)) for name in order
                ]
                style = {
                    "color": colors[j],
                    "hatch": hatch,
                    "edgecolor": "white" if hatch else None,
                }
                out.append((f"{n} dev {'GSPMD' if hatch else 'shardlax'}", ys, None, style))
        return out

    def wire(r, name, n):
        return (
            r["collectives"]["executed_wire_bytes"] / by[name, n, "shardlax"]["minimum_wire_bytes"]
        )

    def mem(r, name, n):
        u = by[name, n, "unsharded"]["memory"]
        return (r["memory"]["arguments"] + r["memory"]["temp"]) / (u["arguments"] + u["temp"])

    fig, axes = plt.subplots(2, 2, figsize=(max(12, 2.2 * len(order) + 2), 8))
    _bars(axes[0, 0], labels, ratio_series("ratio_vs_gspmd"),
          "step time shardlax / GSPMD (median of per-round ratios, p10-p90)",
          "ratio (< 1: shardlax faster)", log=True)  # fmt: skip
    _bars(axes[0, 1], labels, ratio_series("ratio_vs_unsharded"),
          "step time shardlax / one device (simulated devices share 2 cores)",
          "ratio (< 1: shardlax faster)", log=True)  # fmt: skip
    _bars(axes[1, 0], labels, per_impl(wire),
          "collective bytes sent per device / theoretical minimum (hatched: GSPMD)",
          "ratio (1 = minimum)")  # fmt: skip
    _bars(
        axes[1, 1],
        labels,
        per_impl(mem),
        "memory per device (arguments + temp) / one device (hatched: GSPMD)",
        "ratio",
    )
    info = rows[0]["machine"]
    fig.suptitle(
        f"Train steps: shardlax vs GSPMD vs one device -- simulated CPU devices on "
        f"{info['cpu_count']} cores, jax {info['jax']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="device counts; each row runs on a mesh of each")  # fmt: skip
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--set", nargs="*", default=[], metavar="ROW.KEY=INT",
                   help="override a size, e.g. tp_mlp.batch=512")  # fmt: skip
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT, help="output directory")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 repeats")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop at the first failing row")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 1
    if args.devices is None:
        args.devices = [4] if args.quick else list(DEVICES)
    sizes = {k: dict(v[1] if args.quick else v[0]) for k, v in SIZES.items()}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        sizes[name][field] = int(value)
    C.setup_devices(max(args.devices))

    t0 = time.perf_counter()
    rows, skipped = [], {}
    for n in args.devices:
        for name in args.rows:
            builder = ROWS.get(name)
            if builder is None:
                skipped[name] = "no row function yet (its shardlax feature has not landed)"
                print(f"{name:10s} skipped: {skipped[name]}")
                continue
            try:
                row = builder(sizes[name], n, jax.devices()[:n])
                rows += measure(row, args)
            except Skip as e:
                skipped[name] = str(e)
                print(f"{name:10s} skipped: {e}")
            except Exception as e:  # a row that breaks must not cost the others
                if args.strict:
                    raise
                skipped[f"{name} (n={n})"] = f"failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"{name:10s} n={n} FAILED: {type(e).__name__}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_jsonl(args.out / "layers.jsonl", rows)
    (args.out / "layers.md").write_text(markdown(rows, skipped))
    written = ["layers.jsonl", "layers.md"]
    if rows and not args.no_plot and C.have_matplotlib():
        plot(rows, args.out / "layers.png")
        written.append("layers.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)} in "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(C.SIMULATED_NOTE)


if __name__ == "__main__":
    main()
