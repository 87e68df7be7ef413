"""`fully_shard`: make any Flax NNX module an FSDP (ZeRO-3) unit.

`fully_shard(module, mesh=mesh)` splits every `nnx.Param` of `module` over the
fsdp mesh axis (each device stores 1/N of it) and makes the module itself a
unit, as FSDP2 does: its class becomes a subclass of `FSDPModule` and of its
own class, so its attributes and nnx paths stay as they were (optax labels,
checkpoints, `nnx.state`), and its `__call__` runs inside one `jax.shard_map`: the parameters
are all-gathered on entry, the module computes on its batch shard, and the
gathered parameters are freed after the forward (`reshard_after_forward`,
the default) and gathered again in the backward. Gradients leave
reduce-scattered, in the parameters' sharded layout.

Collectives per unit and training step (N = fsdp axis size, |p| = the bytes
of a parameter in the gather dtype, |g| in the reduce dtype):
  forward:  1 all-gather per parameter over `fsdp`, |p| (N-1)/N on the wire.
  backward: 1 reduce-scatter per parameter over `fsdp`, |g| (N-1)/N; with
            `reshard_after_forward=True`, 1 more all-gather per parameter whose
            value the backward needs (a matmul's weight; not a bias); with a
            pure data axis too, 1 all-reduce of each 1/N gradient shard over it.
Memory per device: parameters |P|/N, plus one unit's gathered parameters while
it runs, plus activations.

Which dim is split: dim 0 when N divides it (as FSDP2 does), else the first
dim N divides. A parameter none of whose dims N divides (a (10,) bias on 8
devices) is kept whole on every device, as DeepSpeed's persistence threshold
keeps small parameters: no gather, and its gradient is all-reduced over the
batch axes (1 all-reduce of its bytes). Nothing is padded, so logical shapes
stay those of the module for the user, the optimizer and checkpoints.

What a unit does with a call (FSDP2's contract, made exact):
  - arguments: arrays whose leading dim is the batch (that of the first array
    argument) are split over the batch axes; other arrays are replicated;
    `nnx.Rngs` / modules travel as replicated state and come back updated;
    anything else (flags, Python scalars) is static.
  - outputs: per-example arrays (leading dim the per-device batch, depending
    on the batch shard) are concatenated over the batch axes; arrays that do
    not depend on the batch shard are returned replicated; anything else (a
    mean over the batch shard, a Python value) is a clear error.
  - state: every non-parameter Variable the forward updates comes back into
    the module. It is stored replicated, so an update computed from one
    device's batch shard is a clear error; `nnx.BatchNorm` (training) uses
    global-batch statistics (`kernels.global_batch_moments`, one all-reduce
    over the batch axes forward and one backward) and `nnx.Dropout` draws the
    mask of the global array (`kernels.sharding_invariant_dropout`):
    bit-identical to the unwrapped module on one device, rng counters
    advancing as there.
  - tensor parallelism: shardlax layers inside the unit (the twins of
    `shardlax.parallelize`, applied first, as torchtitan applies TP before
    FSDP) run as per-device code in the unit's `shard_map`, their collectives
    over the model axis their own; the unit stores each of their parameters
    split over the fsdp axis too (`P('fsdp', 'model')` for a column kernel)
    and gathers the model-local shard over fsdp. A layer built with
    `fsdp_axis` gathers its own. Sequence-parallel layers are refused.
  - nesting: `fully_shard` blocks, then the root: the root gathers only the
    parameters no inner unit owns; inner units run as per-device code inside
    the root's `shard_map`.
  - methods: public methods of the module's class run through the unit
    (`fully_shard(embedder).attend(h)`); `register_fsdp_forward_method` adds
    private ones (an unregistered private method called from outside is an
    error: it would run on sharded parameters); configuration methods
    (nnx.Module's own, `set_view`) run as they are.
  - manual mode: called inside a `shard_map` over every live axis of its mesh
    (`shardlax.mesh.is_manual`), the unit runs its body on the local shards it
    is given (parameters as local shards of `fsdp_config.param_specs`).

Example:
  >>> mesh = shardlax.make_mesh(fsdp=8)
  >>> plain = nnx.Linear(512, 512, rngs=nnx.Rngs(0))
  >>> x = jnp.ones((16, 512))
  >>> want = plain(x)
  >>> block = fully_shard(plain, mesh=mesh)  # the same module, its parameters 1/8 per device
  >>> block is plain, isinstance(block, shardlax.fsdp.FSDPModule)
  (True, True)
  >>> block.kernel[...].sharding.spec
  P('fsdp', None)
  >>> y = nnx.jit(lambda m, x: m(x))(block, x)
  >>> bool(jnp.allclose(y, want, atol=1e-5))
  True

References:
  Zhao et al., "PyTorch FSDP", 2023 (arXiv:2304.11277); FSDP2's
  `torch.distributed.fsdp.fully_shard`.
  Rajbhandari et al., "ZeRO", 2020 (arXiv:1910.02054), stage 3.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

from flax import nnx
from jax.sharding import Mesh

from shardlax._axes import FSDP
from shardlax._fsdp_scan import fully_shard_scan as fully_shard_scan
from shardlax._fsdp_unit import FSDPModule as FSDPModule
from shardlax._fsdp_unit import UnitConfig as UnitConfig
from shardlax._fsdp_unit import _make_unit, _unit_class
from shardlax.precision import MixedPrecision


def register_fsdp_forward_method(unit: FSDPModule, name: str) -> None:
    """Run `unit.<name>(...)` through the unit (parameters gathered), like FSDP2's API.

    Public methods of the wrapped module already are (`fully_shard(embedder)
    .attend(x)`); register a private one (`_decode`) with this.
    """
    if not isinstance(unit, FSDPModule):
        raise TypeError(
            f"register_fsdp_forward_method(unit={type(unit).__name__}): expected the "
            f"FSDPModule that fully_shard returned."
        )
    config = unit.fsdp_config
    if not inspect.isfunction(inspect.getattr_static(config.base, name, None)):
        raise ValueError(
            f"register_fsdp_forward_method(name={name!r}): {config.base.__name__} has no "
            f"method {name!r}."
        )
    methods = (*config.forward_methods, name)
    unit.__class__ = _unit_class(config.base, methods)
    unit.fsdp_config = dataclasses.replace(config, forward_methods=methods)


def fully_shard(
    module: nnx.Module,
    *,
    mesh: Mesh | None = None,
    axis: str = FSDP,
    reshard_after_forward: bool = True,
    policy: MixedPrecision | None = None,
    batch_axes: Sequence[str] | None = None,
    state_reduction: str | None = None,
    per_device_random: bool = False,
) -> FSDPModule:
    """Make `module` an FSDP unit: parameters 1/N per device, gathered on use.

    Args:
      module: any `nnx.Module` (nnx.Linear, nnx.Embed, nnx.LayerNorm, a block)
        or a whole model containing units. Its
        parameters are re-placed in place (sharded over `axis`, or kept whole
        when N divides none of their dims); other state is replicated and its
        updates come back (see the module docstring for arguments, outputs,
        state, nesting and methods).
      mesh: the mesh; default the one set with `jax.set_mesh`.
      axis: the fsdp mesh axis (default ``'fsdp'``).
      reshard_after_forward: free the gathered parameters after the forward
        and all-gather them again in the backward (True, FSDP2's default), or
        keep them until the backward (False: one all-gather fewer per
        parameter, one unit of gathered parameters more in memory).
      policy: a `MixedPrecision`: parameters gathered and computed in
        `param_dtype` (inputs cast to it on entry), gradients reduced in
        `reduce_dtype`, outputs cast to `output_dtype`.
      batch_axes: mesh axes the leading dim of every input is split over;
        default whichever of ``('data', 'fsdp')`` the mesh has.
      state_reduction: ``'mean'``: a floating Variable the forward computes
        from the device's batch shard (a running mean of activations) is
        averaged over the batch axes (1 all-reduce each, declared by the
        Trainer), as `Trainer(state_reduction='mean')` does outside units;
        ``None`` (default): such an update is an error.
      per_device_random: the unit refuses random numbers its module's own
        code draws (`jax.random.*` with the key every device holds) in a
        shape that follows the batch shard, which every device would repeat
        (`shardlax._random_check`); True accepts them (not equal to one device).

    Returns:
      An `FSDPModule`; call it like the module, inside `nnx.jit`.
    """
    return _make_unit(
        module,
        mesh=mesh,
        axis=axis,
        reshard_after_forward=reshard_after_forward,
        policy=policy,
        batch_axes=batch_axes,
        state_reduction=state_reduction,
        per_device_random=per_device_random,
    )
