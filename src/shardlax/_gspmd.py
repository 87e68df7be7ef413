"""The constrained GSPMD twin of TinyLM: the same math in plain jnp, sharded by XLA.

The best a careful GSPMD user writes: parameters and batch placed by
`NamedSharding`, and `with_sharding_constraint` on the residual stream after
the embedding and every residual add, as MaxText does. Without those
constraints sharding propagation can replicate activations at scale (a
TinyLM-like 1.1B model on 64 devices: 161 GB temp per device unconstrained,
4.1 GB constrained). No shard_map and no hand-written collective here: every
collective of the twin is XLA's choice. Used by `shardlax.plan` and the
benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def constraint(mesh, spec) -> Callable:
    """`x -> with_sharding_constraint(x, NamedSharding(mesh, spec))`."""
    sharding = NamedSharding(mesh, spec)
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def _pin(constrain, x):
    return x if constrain is None else constrain(x)


def tinylm_loss(cfg, params: dict, tokens, targets, constrain: Callable | None = None):
    """TinyLM's loss in plain jnp on its parameter dict (`nnx.to_pure_dict` of its params).

    The math of `shardlax.models.TinyLM` (pre-norm blocks of RoPE attention and
    an MLP in a `lax.scan`, tied or separate head, padded vocabulary masked out
    of the softmax). It borrows only collective-free math from
    `shardlax.kernels` (RMSNorm, RoPE, causal attention). `constrain` pins the
    residual stream `[B, S, D]` (the constrained twin); None on one device.
    """
    from shardlax import kernels as K

    def lin(x, layer):
        y = x @ layer["kernel"]
        return y + layer["bias"] if "bias" in layer else y

    table = params["embed"]["embedding"]  # [V_pad, D]
    x = _pin(constrain, jnp.take(table, tokens, axis=0))  # [B, S, D]
    b, s, _ = x.shape
    hd = cfg.d_model // cfg.n_heads

    def block(x, p):
        h = K.rms_norm(x, p["attn_norm"]["scale"])
        a = p["attn"]
        q = K.rotary_embedding(lin(h, a["q_proj"]).reshape(b, s, -1, hd), theta=cfg.rope_theta)
        k = K.rotary_embedding(lin(h, a["k_proj"]).reshape(b, s, -1, hd), theta=cfg.rope_theta)
        v = lin(h, a["v_proj"]).reshape(b, s, -1, hd)
        o = K.dot_product_attention(q, k, v).reshape(b, s, -1)
        x = _pin(constrain, x + lin(o, a["o_proj"]))
        h = K.rms_norm(x, p["mlp_norm"]["scale"])
        m = p["mlp"]
        if cfg.activation == "swiglu":
            h = jax.nn.silu(lin(h, m["gate"])) * lin(h, m["up"])
        else:
            h = jax.nn.gelu(lin(h, m["up"]))
        return _pin(constrain, x + lin(h, m["down"])), None

    if cfg.remat:
        block = jax.checkpoint(block)
    x, _ = jax.lax.scan(block, x, params["blocks"])
    x = K.rms_norm(x, params["final_norm"]["scale"])
    head = table.T if cfg.tie_embeddings else params["head"]["kernel"]  # [D, V_pad]
    logits = x @ head
    logits = jnp.where(jnp.arange(logits.shape[-1]) < cfg.vocab, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def follow_params(opt_state: Any, params: Any, spec_of_param: dict[str, P]) -> Any:
    """A PartitionSpec per optimizer-state leaf: that of the parameter its path ends with
    (Adam's `mu`/`nu` follow their parameter), `P()` for the rest (counts)."""

    def spec(path, _):
        key = jax.tree_util.keystr(path)
        for p, s in spec_of_param.items():
            if key.endswith(p):
                return s
        return P()

    del params
    return jax.tree_util.tree_map_with_path(spec, opt_state)


def abstract_tinylm_step(cfg, param_specs: dict, mesh, batch_spec: P, residual_spec: P | None,
                         tx: optax.GradientTransformation, batch: int, seq: int):  # fmt: skip
    """(jitted step, abstract args) of one Adam step of the twin, nothing allocated.

    `param_specs`: a pure dict of `jax.ShapeDtypeStruct`s with the shardings the
    parameters are stored in (those of the shardlax model, so only the
    collectives are XLA's choice); `mesh` an Auto mesh, or None for one device.
    """
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_specs)
    opt = jax.eval_shape(tx.init, shapes)
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    pin = None if mesh is None or residual_spec is None else constraint(mesh, residual_spec)

    def step(params, opt_state, tokens, targets):
        def loss_of(p):
            return tinylm_loss(cfg, p, tokens, targets, constrain=pin)

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1)), (shapes, opt, tok, tok)
    flat = {
        jax.tree_util.keystr(path): s.sharding.spec
        for path, s in jax.tree_util.tree_flatten_with_path(param_specs)[0]
    }
    p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s.sharding.spec), param_specs)
    o_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), follow_params(opt, shapes, flat))
    b_sh = NamedSharding(mesh, batch_spec)

    def put(tree, shardings):
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
        )

    fn = jax.jit(
        step,
        in_shardings=(p_sh, o_sh, b_sh, b_sh),
        out_shardings=(p_sh, o_sh, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=b_sh)
    return fn, (put(shapes, p_sh), put(opt, o_sh), tok, tok)
