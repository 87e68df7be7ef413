"""The rows of the layer benchmark: one small function per strategy.

Each `row_*(cfg, n, devices) -> Row` builds the shardlax step, its GSPMD twin
and its one-device twin for `n` devices, and states the theoretical minimum
collectives of the strategy (the formulas are in `layers.py`'s docstring).
A row whose shardlax feature is missing raises `Skip`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from _common import GSPMD_BASELINE
from _steps import (
    Candidate,
    ParallelMLP,
    PlainMLP,
    PlainStack,
    ResidualLinear,
    Row,
    Scanned,
    Skip,
    adam,
    constraint,
    dict_step,
    minimum,
    mlp_param_bytes,
    module_candidate,
    mse,
    on_device,
    optax_step,
    place,
    plain_candidates,
    plain_tinylm_loss,
    regression_batch,
    specs_of,
)

SIZES = {  # default, --quick
    "tp_mlp": (dict(batch=256, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "fsdp_deep": (dict(batch=64, d=512, layers=8, remat=0), dict(batch=8, d=32, layers=2, remat=0)),
    "fsdp_deep_remat": (
        dict(batch=64, d=512, layers=8, remat=1),
        dict(batch=8, d=32, layers=2, remat=1),
    ),
    "fully_shard_deep": (
        dict(batch=64, d=512, layers=8, remat=1, fully_shard=1),
        dict(batch=8, d=32, layers=2, remat=1, fully_shard=1),
    ),
    "zero2": (dict(batch=256, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "fsdp_tp": (dict(batch=128, d=512, f=2048), dict(batch=16, d=32, f=64)),
    "tinylm": (
        dict(batch=8, seq=64, vocab=512, d=128, layers=4, heads=4, f=512),
        dict(batch=4, seq=8, vocab=64, d=32, layers=2, heads=4, f=64),
    ),
}


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

    # the batch placed on the mesh as the GSPMD candidate's is (replicated: TP splits no
    # batch dim), so neither step copies its inputs out of one device on every call
    placed = tuple(jax.device_put(v, NamedSharding(mesh, P())) for v in batch)
    cands = {"shardlax": module_candidate(ParallelMLP(d, f, nnx.Rngs(0), mesh), placed, mesh)}
    pins = (constraint(auto, P(None, "model")), constraint(auto, P()))
    plain = PlainMLP(d, f, nnx.Rngs(0), constrain=pins)
    cands |= plain_candidates(plain, batch, auto, spec_of, P(), devices)
    return Row(
        baseline=f"{GSPMD_BASELINE}: hidden P(None, 'model'), output P()",
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
    cands = {"shardlax": Candidate(trainer.step, trainer.init(), trainer.place_batch(batch), mesh)}

    def opt_spec(path: str):
        # Adam's moments split on their first dim (ZeRO-2 under GSPMD); the count replicated.
        if ".mu" in path or ".nu" in path:
            return P("data", None) if "kernel" in path else P("data")
        return P()

    pins = (constraint(auto, P("data", None)), constraint(auto, P("data", None)))
    cands |= plain_candidates(
        PlainMLP(d, f, nnx.Rngs(0), constrain=pins), batch, auto, lambda _: P(), P("data"),
        devices, opt_spec,
    )  # fmt: skip
    p_bytes = mlp_param_bytes(d, f)
    return Row(
        baseline=f"{GSPMD_BASELINE}: hidden and output P('data', None)",
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

    remat = bool(cfg["remat"])
    pin = constraint(auto, P("fsdp", None))  # the residual stream [B/fsdp, D]
    if cfg.get("fully_shard"):
        # shardlax.fsdp.fully_shard_scan: the flax scan-over-layers pattern, each
        # layer an FSDP unit; its plain twin is built by the same pattern (same values).
        fully_shard_scan = getattr(shardlax.fsdp, "fully_shard_scan", None)
        if fully_shard_scan is None:
            raise Skip("shardlax.fsdp.fully_shard_scan is not available")

        def block(rngs):
            return ResidualLinear(d, init, rngs)

        sharded = fully_shard_scan(block, layers, rngs=nnx.Rngs(0), mesh=mesh, remat=remat)
        plain = PlainStack(block, layers, nnx.Rngs(0), remat=remat, constrain=pin)
    else:
        try:
            sharded = Scanned(fsdp_linear, layers, nnx.Rngs(0), remat=remat)
        except TypeError as e:
            raise Skip(f"the shardlax linears take no fsdp_axis yet ({e})") from e
        plain = Scanned(
            lambda rngs: nnx.Linear(d, d, kernel_init=init, rngs=rngs), layers, nnx.Rngs(0),
            remat=remat, constrain=pin,
        )  # fmt: skip
    x, y = regression_batch(b, d)
    spec = P("fsdp")
    batch = tuple(jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, y))
    cands = {"shardlax": module_candidate(sharded, batch, mesh)}
    cands |= plain_candidates(plain, (x, y), auto, specs_of(sharded), spec, devices)
    fs = ["fsdp"]
    return Row(
        baseline=f"{GSPMD_BASELINE}: residual stream P('fsdp', None) at every layer",
        name="fully_shard_deep"
        if cfg.get("fully_shard")
        else "fsdp_deep" + ("_remat" if remat else ""),
        strategy=f"FSDP / ZeRO-3, {layers} layers in lax.scan"
        + (" (shardlax.fsdp.fully_shard_scan)" if cfg.get("fully_shard") else "")
        + (", each under jax.checkpoint" if cfg["remat"] else ""),
        mesh=f"fsdp={n}",
        config=dict(cfg, n=n),
        candidates=cands,
        minimum=[
            minimum("all-gather", fs, d * d * 4, n, 2 * layers, "W per layer: forward + backward"),
            minimum(
                "all-gather",
                fs,
                d * 4,
                n,
                (2 if remat else 1) * layers,
                "b per layer: forward" + (" + recompute" if remat else ""),
            ),
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
    pins = (constraint(auto, P("fsdp", "model")), constraint(auto, P("fsdp", None)))
    cands |= plain_candidates(
        PlainMLP(d, f, nnx.Rngs(0), constrain=pins), (x, y), auto, specs_of(sharded), P("fsdp"),
        devices,
    )  # fmt: skip
    m = model_n
    fs = ["fsdp"]
    return Row(
        baseline=f"{GSPMD_BASELINE}: hidden P('fsdp', 'model'), output P('fsdp', None)",
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

    pin = constraint(auto, P("fsdp", None, None))  # the residual stream [B/fsdp, S, D]

    def loss_fn(p, tokens, targets):
        return plain_tinylm_loss(lm_cfg, p, tokens, targets, constrain=pin)

    def single_loss_fn(p, tokens, targets):
        return plain_tinylm_loss(lm_cfg, p, tokens, targets)

    host = jax.tree.map(np.asarray, pure)
    g_params = place(host, auto, lambda path: spec_of(path + ".value"))
    g_opt = place(tx.init(host), auto, lambda path: spec_of(path + ".value"))
    g_state = (g_params, g_opt)
    shardings = jax.tree.map(lambda v: v.sharding, g_state)
    g_batch = tuple(jax.device_put(v, NamedSharding(auto, batch_spec)) for v in (tokens, targets))
    cands["gspmd"] = Candidate(dict_step(loss_fn, tx, shardings), g_state, g_batch, auto)
    cands["unsharded"] = Candidate(
        dict_step(single_loss_fn, tx),
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
    scaled: set[int] = set()
    for dc in per_block:  # listed once by TinyLM; they run once per layer
        for i, (m, record) in enumerate(zip(mins, declared, strict=True)):
            if i not in scaled and record == dc:  # the same structured record
                scaled.add(i)
                m["count"] *= lm_cfg.n_layers
                m["why"] += f" (x{lm_cfg.n_layers} layers)"
                break
    return Row(
        baseline=f"{GSPMD_BASELINE}: residual stream P('fsdp', None, None) after the "
        "embedding and every residual add",
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
