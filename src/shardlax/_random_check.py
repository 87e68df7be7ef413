"""Refuse random numbers a device draws for its own batch shard with the shared key.

Inside a step the model runs on each device's batch shard. A draw in the
model's own code, `jax.random.normal(key, x.shape)` with the key every device
holds, then has the *local* shape: every device draws the numbers one device
draws for the first examples of the batch, repeats them for its own examples,
and the run differs from one device without any error (a VAE's noise, a
hand-written dropout). The layers shardlax handles (`nnx.Dropout`,
`nnx.MultiHeadAttention`'s dropout, `shardlax.nn.Dropout`) draw their slice of
the global draw with `threefry2x32` directly and never bind `random_bits`.

The check reads the step's traced program (cached by `jax.jit`, so the call
that follows does not trace again). Only if it draws random numbers at all
is the step traced a second time, abstractly, for a batch twice as large: a
draw whose shape changes with the batch is refused, naming its shape and the
line of the model's code that makes it.
"""

from __future__ import annotations

from typing import Any

import jax
from jax._src import core as jax_core
from jax._src import source_info_util


def random_draws(jaxpr) -> list[tuple[tuple[int, ...], str]]:
    """(shape, source line) of every `random_bits` in `jaxpr`, nested programs included."""
    out: list[tuple[tuple[int, ...], str]] = []

    def walk(j, outer: str):
        for e in j.eqns:
            # jax.random's functions are jitted: their inner equations point into jax, the
            # call equation around them at the user's line
            where = source_info_util.summarize(e.source_info) or outer
            if e.primitive.name == "random_bits":
                out.append((tuple(e.params["shape"]), where))
            for sub in jax_core.jaxprs_in_params(e.params):
                walk(sub, where)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, "")
    return out


def doubled(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct of `x` with its leading (batch) dim doubled (laid out as `sharding`)."""
    shape = tuple(x.shape)
    shape = (2 * shape[0], *shape[1:]) if shape else shape
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        if hasattr(x, "shape") else x,
        tree,
    )  # fmt: skip


class RandomChecked:
    """A jitted step whose first call per batch signature refuses per-shard random draws.

    `step(state, batch)` as the jitted step; `.lower`, `.trace`, ... are the
    jitted step's. `owner` names the caller in errors, `devices` is how many
    devices the batch is split over (no check when it is 1: the local batch
    is the global one).
    """

    def __init__(self, step, owner: str, devices: int, flag: str):
        self._step, self._owner, self._devices, self._flag = step, owner, devices, flag
        self._seen: set = set()

    def __getattr__(self, name):
        return getattr(self._step, name)

    def __call__(self, state, batch):
        if self._devices > 1:
            leaves, tree = jax.tree.flatten(batch)
            key = (tree, tuple((jax.numpy.shape(x), str(jax.numpy.result_type(x))) for x in leaves))
            if key not in self._seen:
                self._check(state, batch)
                self._seen.add(key)
        return self._step(state, batch)

    def _check(self, state, batch) -> None:
        check_draws(
            self._owner,
            self._step.trace(state, batch).jaxpr,
            lambda: self._step.trace(_abstract(state), jax.tree.map(doubled, batch)).jaxpr,
            self._devices,
            self._flag,
        )


def check_draws(owner: str, jaxpr, trace_doubled, devices: int, flag: str) -> None:
    """Raise if a `random_bits` of `jaxpr` (a per-device program) follows the batch shard.

    `trace_doubled()` traces the same program for a batch twice as large (called
    only when `jaxpr` draws at all); a draw whose shape differs there, or a
    count of draws that does, follows the batch.
    """
    draws = random_draws(jaxpr)
    if not draws:
        return
    twice = random_draws(trace_doubled())
    for i, (shape, where) in enumerate(draws):
        if i < len(twice) and twice[i][0] == shape:
            continue
        raise ValueError(
            f"{owner}: the model draws random numbers of shape {shape} on each "
            f"device (at {where or 'an unknown line'}), a shape that follows the device's "
            f"batch shard: with the key every device holds, the {devices} devices would draw "
            f"the same numbers for different examples, and training would differ from one "
            f"device. Draw masks with nnx.Dropout or shardlax.nn.Dropout (each device gets "
            f"its slice of the one-device mask), or draw the numbers for the global batch in "
            f"your input pipeline and pass them in the batch; {flag} accepts per-device draws."
        )
    if len(twice) != len(draws):
        raise ValueError(
            f"{owner}: the model draws random numbers {len(draws)} times for a batch and "
            f"{len(twice)} times for a batch twice as large (at "
            f"{twice[len(draws)][1] or 'an unknown line'}): a draw that follows the device's "
            f"batch shard repeats on every device. Draw masks with nnx.Dropout or "
            f"shardlax.nn.Dropout, or pass the numbers in the batch; {flag} accepts "
            f"per-device draws."
        )
