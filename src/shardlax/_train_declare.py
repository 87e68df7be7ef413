"""What a `Trainer`'s step promises to communicate: `declared_collectives`.

`Trainer` (`shardlax.train`) inherits it from `_Declarations`; the audit
(`shardlax.audit.compare`) checks it against the compiled step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from shardlax.declarations import Declared, Role, hlo_dtype


class _Declarations:
    """The declarations half of `shardlax.Trainer` (see the module docstring)."""

    def declared_collectives(
        self,
        batch: Any,
        *,
        model_collectives: Sequence[Declared] = (),
        loss_in_model: bool = False,
    ) -> list[Declared]:
        """The collectives one step compiles to, for a batch shaped like `batch`.

        Per step, for every bucket of parameters replicated over the same batch
        axes (`N` their size, `P_b` the padded bytes `N * S_b * itemsize`,
        `n_b` the unpadded bytes), the strategy's reduction
        (`shardlax.strategies`):

        - dp, fsdp, fsdp+tp: all-reduce `n_b`.
        - zero1: all-reduce `P_b`, then all-gather `P_b`.
        - zero2: reduce-scatter `P_b`, then all-gather `P_b`.

        Plus, found by tracing the step once: 1 scalar f32 all-reduce of the
        loss over the batch axes it varies over (none when the model reduced
        it itself); 1 scalar all-reduce per group of identically split leaves
        of every global norm `tx` computes; 1 f32 `[2, F]` all-reduce per
        training-mode `nnx.BatchNorm` call (its statistics). And the model's
        own collectives (`model_collectives`: FSDP gathers and reduce-scatters
        over `fsdp`, tensor-parallel collectives over `model`, as the layers'
        `declared_collectives(..., grad=True)` state them). The layers'
        all-reduces of parameter gradients over the batch axes (records with
        `role=Role.GRAD_REDUCE`) are left out of `model_collectives`: inside
        the Trainer the strategy's buckets do them; a model's own loss
        reduction (`Role.LOSS`) is kept only with `loss_in_model`.

        Collectives over axes of size 1 are not declared (they do not compile).

        Args:
          batch: a batch (or `jax.ShapeDtypeStruct`s) shaped like the step's.
          model_collectives: the model's declared collectives.
          loss_in_model: `model_collectives` include the loss's reduction over
            the batch (a model whose loss runs inside its own kernel, such as
            `TinyLM.declared_collectives`): keep those entries.
        """
        self._check_batch(batch)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
        from shardlax import _flax_layers

        with _flax_layers.recording() as rec:
            jax.eval_shape(self._step, jax.eval_shape(self.init), abstract)
        live = set(self.live)
        out = []
        if self._loss_axes:
            out.append(
                Declared("all-reduce", self._loss_axes, "f32", 1, 4, "loss: mean over the batch")
            )
        for d in model_collectives:
            over_batch = d.kind == "all-reduce" and set(d.axes) & live
            if over_batch and d.role is Role.GRAD_REDUCE:
                # a parameter gradient's sum: over the batch axes it is the strategy's
                # (buckets below); what is left of it is the layer's sum over the others
                rest = tuple(a for a in d.axes if a not in live)
                if rest:
                    out.append(dataclasses.replace(d, axes=rest))
                continue
            if over_batch and d.role is Role.LOSS and not loss_in_model:
                continue  # the step reduces the loss itself (declared above)
            out.append(d)
        for (axes, _), buckets in self.bucket_groups.items():
            for b in buckets:
                gdt, rdt = self._bucket_dtypes(b)
                out += self.strategy.declare(b, axes, rdt, gdt)
        for axes, features, fast in rec.stats:
            axes = tuple(a for a in axes if self.mesh.shape[a] > 1)
            if not axes:
                continue
            if fast:
                out.append(Declared("all-reduce", axes, "f32", 1, 2 * features * 4,
                                    "BatchNorm statistics (mean, mean of squares)"))  # fmt: skip
            else:
                out += [
                    Declared("all-reduce", axes, "f32", 1, features * 4, f"BatchNorm {w}")
                    for w in ("mean", "variance")
                ]
        for axes, where, nbytes, dtype in [*self._state_reductions, *rec.state_means]:
            out.append(Declared("all-reduce", axes, hlo_dtype(dtype), 1, nbytes,
                                f"state {where}: mean over the batch"))  # fmt: skip
        for axes, dtype in self._norm_reductions or ():
            item = jnp.dtype(dtype).itemsize
            out.append(Declared("all-reduce", axes, hlo_dtype(dtype), 1, item, "global norm"))
        return out
