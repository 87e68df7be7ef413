"""The first step of a `Trainer` on a `parallelize`d model checks the model's per-device code.

Inside the Trainer's step the tensor-parallel twins return local shards and
the model's own code between them runs per device (`shardlax.parallelize`);
what no trace-time check can see (a norm over split features, mispaired GQA
heads) is caught here by comparing the first loss with the one on global
arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_OWNER = "Trainer"


class FirstStepChecked:
    """`Trainer.step` for a parallelized model: the first call checks the per-device code.

    Inside the step the model's own code between tensor-parallel twins runs on
    local shards; it is right only if it never mixes a split dim (see
    `shardlax.parallelize`). The first call compares the step's loss with the
    same loss computed at top level (global arrays, as on one device), where
    that code is right by construction. The tolerance is a detector's, not an
    equality test: the two differ by f32 summation order (~1e-6 relative) when
    the code is per-device-safe, and by the effect of the wrong values when
    it is not (7e-4 relative for mispaired GQA heads at initialisation, 0.5
    after training). A wrong effect below the bound is not caught.
    """

    #: relative bounds: 50x the f32 equality tolerance of the suite (2e-5), 16-bit compute
    RTOL_F32, RTOL_16 = 1e-4, 1e-2

    def __init__(self, step, trainer, twins):
        self._step, self._trainer, self._twins, self._checked = step, trainer, twins, False

    def __getattr__(self, name):  # lower, trace, eval_shape, ... of the jitted step
        return getattr(self._step, name)

    def __call__(self, state, batch):
        if self._checked:
            return self._step(state, batch)
        t = self._trainer
        model = t.model(state)
        graphdef, params = nnx.split(model)

        def reference(params, batch):  # top level: the twins run their own shard_maps
            return t.loss_fn(nnx.merge(graphdef, params, copy=True), batch).astype(jnp.float32)

        try:
            want = float(jax.jit(reference)(params, batch))
        except Exception:  # the code cannot run at top level on this mesh: nothing to compare
            self._checked = True
            return self._step(state, batch)
        low = any(
            jnp.issubdtype(d, jnp.floating) and jnp.dtype(d).itemsize < 4
            for d in [x.dtype for x in jax.tree.leaves(params)]
            + [m.dtype for _, m in nnx.iter_modules(model) if getattr(m, "dtype", None)]
        )
        rtol = self.RTOL_16 if low else self.RTOL_F32
        del model, params
        state, metrics = self._step(state, batch)  # donates the old state
        got = float(metrics["loss"])
        self._checked = True
        if not abs(got - want) <= rtol * max(1.0, abs(want)):
            raise ValueError(
                f"{_OWNER}: the first step's loss {got!r}, computed with the model's code on "
                f"per-device shards of the tensor-parallel twins ({', '.join(self._twins[:4])}"
                f"{', ...' if len(self._twins) > 4 else ''}), differs from the same loss on "
                f"global arrays, {want!r} (relative {abs(got - want) / max(1.0, abs(want)):.2e}"
                f" > {rtol:g}). The model's code between the twins reads a split dim as if it "
                f"were whole: a norm or softmax over split features, heads paired with kv heads "
                f"that are not split the same way, jnp.split of a split output. Split the "
                f"layers that code mixes the same way (e.g. Colwise on the kv projections too), "
                f"Replicate() them, or write that code for local shards; "
                f"Trainer(check_tensor_parallel=False) skips this check."
            )
        return state, metrics


__all__ = ["FirstStepChecked"]
