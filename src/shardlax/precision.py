"""Mixed precision for FSDP: which dtype parameters are gathered, computed and reduced in.

`MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)` is the
policy of PyTorch FSDP2's `MixedPrecisionPolicy`: parameters stay stored in
their own dtype (usually f32, 1/N of them per device); each device casts its
*shard* to `param_dtype` before the all-gather, so the gather moves half the
bytes of an f32 one, and the layer computes in `param_dtype`; the gradient of
the gathered parameter is cast to `reduce_dtype` before the reduce-scatter,
so gradients are summed across devices in f32. The reduced shard is then cast
to the stored dtype, which is the dtype of the gradient the optimizer sees.

Where the policy acts: the FSDP gather of `shardlax.nn` layers
(`mixed_precision=` argument) and `shardlax.fsdp.fully_shard(policy=...)`.
Parameters that are not FSDP-sharded (`fsdp_axis=None`) are cast to
`param_dtype` on use and reduced in their stored dtype.

Backend note: XLA:CPU runs a bf16 all-gather in f32 (it upcasts the
operand). shardlax therefore gathers 16-bit floats as their bits (`u16`),
which no backend rewrites: the compiled HLO shows a `u16` all-gather of half
the bytes, bit-identical to a bf16 one. Reductions cannot be bit-cast; a
`reduce_dtype=jnp.bfloat16` reduce-scatter compiles to bf16 on GPU/TPU and
to f32 on XLA:CPU.

References:
  Micikevicius et al., "Mixed Precision Training", 2018 (arXiv:1710.03740).
  Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
  Parallel", 2023 (arXiv:2304.11277), section 4.4 (mixed precision).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """Dtypes of the FSDP gather, the compute and the gradient reduction.

    Args:
      param_dtype: dtype the shard is cast to before the all-gather and the
        layer computes in; ``None`` keeps the stored dtype.
      reduce_dtype: dtype the gradient is reduce-scattered (and all-reduced
        over pure data axes) in; ``None`` means the stored dtype of the
        parameter (f32 for f32 parameters).
      output_dtype: dtype the unit's outputs are cast to; ``None`` leaves
        them as computed. Used by `fully_shard`.

    Example:
      >>> policy = MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)
    """

    param_dtype: Any = None
    reduce_dtype: Any = None
    output_dtype: Any = None

    def __post_init__(self):
        for field in ("param_dtype", "reduce_dtype", "output_dtype"):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                dtype = jnp.dtype(value)
            except TypeError as e:
                raise TypeError(
                    f"MixedPrecision({field}={value!r}): not a dtype. Pass a floating "
                    f"dtype such as jnp.bfloat16 or jnp.float32, or None."
                ) from e
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"MixedPrecision({field}={value!r}): parameters and gradients are cast "
                    f"to it, so it must be a floating dtype. Pass jnp.bfloat16, "
                    f"jnp.float16 or jnp.float32, or None."
                )
            object.__setattr__(self, field, dtype)

    def gather_dtype(self, stored: Any) -> Any:
        """The dtype a parameter stored as `stored` is all-gathered and computed in."""
        return jnp.dtype(stored) if self.param_dtype is None else self.param_dtype

    def grad_reduce_dtype(self, stored: Any) -> Any:
        """The dtype the gradient of a parameter stored as `stored` is reduced in."""
        return jnp.dtype(stored) if self.reduce_dtype is None else self.reduce_dtype


def wire_dtypes(stored: Any, policy: MixedPrecision | None) -> tuple[Any, Any]:
    """`(compute, reduce)`: the dtype a parameter stored as `stored` is gathered and
    computed in, and the dtype its gradient is reduced in, under `policy` (None:
    both the stored dtype). The one rule every path uses: the layers' FSDP
    gathers, `fully_shard` units and the Trainer's `Placement`s."""
    stored = jnp.dtype(stored)
    if policy is None:
        return stored, stored
    return jnp.dtype(policy.gather_dtype(stored)), jnp.dtype(policy.grad_reduce_dtype(stored))


#: The policy that changes nothing: gather, compute and reduce in the stored dtype.
FULL_PRECISION = MixedPrecision()
