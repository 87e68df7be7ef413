"""Stacked layers as FSDP units scanned with `lax.scan` (`fully_shard_scan`).

The loop itself (`scan_layers`: one unit per step, gathered, applied, freed)
and the checks of what a scanned layer may return (`check_scan_state`) are
used by `shardlax.fsdp.FSDPModule` for units built with `scan=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
from flax import nnx
from jax.sharding import Mesh

from shardlax import kernels
from shardlax._axes import FSDP
from shardlax._fsdp_state import check_state
from shardlax.precision import MixedPrecision

if TYPE_CHECKING:
    from shardlax._fsdp_unit import FSDPModule


def fully_shard_scan(
    make_layer: Callable[[nnx.Rngs], nnx.Module],
    num_layers: int,
    *,
    rngs: nnx.Rngs,
    mesh: Mesh | None = None,
    axis: str = FSDP,
    remat: bool = True,
    reshard_after_forward: bool = True,
    policy: MixedPrecision | None = None,
    batch_axes: Sequence[str] | None = None,
) -> FSDPModule:
    """`num_layers` copies of `make_layer(rngs)`, stacked and scanned, each layer an FSDP unit.

    The layers are built with `nnx.split_rngs` + `nnx.vmap` (the flax
    scan-over-layers pattern), so every parameter gets a leading layer dim of
    size `num_layers`, which is never split; one other dim is split over
    `axis`. The call runs `lax.scan` over the layers inside one `shard_map`:
    step l all-gathers layer l's parameters, applies the layer to the carry,
    and frees them. Per step of training, per layer: 2 all-gathers (forward
    loop, backward loop) and 1 reduce-scatter; with `remat=False,
    reshard_after_forward=False`, 1 all-gather and every layer's gathered
    parameters kept for the backward.

    Args:
      make_layer: builds one layer from `rngs`; the layer maps an array to an
        array of the same shape and dtype (the scan carry).
      num_layers: the number of layers.
      rngs: the rngs, split `num_layers` ways.
      mesh, axis, reshard_after_forward, policy, batch_axes: as `fully_shard`.
      remat: run each layer under `jax.checkpoint` (save only the carry per
        layer; the backward recomputes the layer and re-gathers its
        parameters). Memory: params/N + about one layer's gathered parameters
        + one activation per layer.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"fully_shard_scan(num_layers={num_layers!r}): expected a positive int.")

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make_layer(rngs)

    from shardlax._fsdp_unit import _make_unit  # (it imports this module)

    return _make_unit(
        create(rngs),
        mesh=mesh,
        axis=axis,
        reshard_after_forward=reshard_after_forward,
        policy=policy,
        batch_axes=batch_axes,
        scan=True,
        remat=remat,
    )


def scan_layers(fn, gather, p_shards, r_vals, n_vals, a_vals, *, remat, reshard, check):
    """`lax.scan` over the stacked layers: carry = the (single) input, one FSDP unit per step.

    State: layer l's non-parameter state (`r_vals`, stacked on a leading layer
    dim: BatchNorm statistics, counters, the layers' own rng keys and counts)
    goes in as step l's slice and comes out stacked again, so every update
    a layer makes comes back as it would from a Python loop over the layers;
    state of the call's arguments (`n_vals`: an `nnx.Rngs` passed at call) is
    a loop carry, advanced by each layer in turn, as in that loop. `check`
    raises for an update the scan cannot carry (see `check_scan_state`).

    With `remat`, each step runs under `jax.checkpoint` (nothing saved but the
    carry): the backward loop recomputes the step, all-gather included, so a
    step's gathered parameters live only while it runs, in the forward loop
    and again in the backward loop (2 all-gathers per layer). Without
    `remat`, `reshard` chooses between `fsdp_call`'s re-gather (activations
    saved, 2 all-gathers) and keeping every layer's gathered parameters as
    scan residuals (1 all-gather, the whole model in memory).
    """
    if len(a_vals) != 1:
        raise TypeError(
            f"fully_shard(scan=True): the stacked layers are called with one array (the "
            f"carry), got {len(a_vals)} inputs. Pass the activation only."
        )

    def step(carry, xs):
        h, n_carry = carry
        p_layer, r_layer = xs
        inputs = ((h,), tuple(r_layer), tuple(n_carry), ())
        if remat:
            out, new_r, new_n = fn(gather(p_layer), inputs)
        else:
            out, new_r, new_n = kernels.fsdp_call(
                fn, tuple(p_layer), inputs, gather=gather, reshard_after_forward=reshard
            )
        check(h, out, tuple(r_layer), tuple(new_r), tuple(n_carry), tuple(new_n))
        return (out, tuple(new_n)), tuple(new_r)

    if remat:
        step = jax.checkpoint(step)
    (h, new_n), new_r = jax.lax.scan(
        step, (a_vals[0], tuple(n_vals)), (tuple(p_shards), tuple(r_vals))
    )
    return h, tuple(new_r), tuple(new_n)


def check_scan_state(owner, r_paths, n_paths, h, out, r_old, r_new, n_old, n_new, *,
                      reduction=None):  # fmt: skip
    """What one scanned layer returns must fit the loop: a clear error where it cannot.

    The output is the next layer's input (same shape and dtype as the carry);
    every updated Variable keeps its per-layer shape and dtype (it is stacked
    again over the layers, or carried to the next layer) and does not come
    from this device's batch shard alone (it is stored replicated).
    """
    if not isinstance(out, jax.Array) or (out.shape, out.dtype) != (h.shape, h.dtype):
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, jax.Array) else type(out).__name__
        raise TypeError(
            f"{owner}(scan=True): a layer returned {got} for an input of {h.dtype}"
            f"{list(h.shape)} (per device); the scanned layers pass their output on as the next "
            f"layer's input, so each must return one array of its input's shape and dtype. Use "
            f"fully_shard per layer for layers that change it."
        )
    for what, paths, old, new in (
        ("state", r_paths, r_old, r_new),
        ("argument state", n_paths, n_old, n_new),
    ):
        if reduction is None:  # (with 'mean', reduced once after the loop)
            check_state(owner, what, paths, old, new)
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            if (o.shape, o.dtype) != (n.shape, n.dtype):
                raise ValueError(
                    f"{owner}(scan=True): the forward changes {what} {paths[i]!r} of one layer "
                    f"from {o.dtype}{list(o.shape)} to {n.dtype}{list(n.shape)}; the scan stacks "
                    f"each layer's state over the layers (and carries the call's), so an update "
                    f"must keep the Variable's shape and dtype. Assign values of the same "
                    f"shape and dtype (e.g. `var[...] = new.astype(var.dtype)`)."
                )
