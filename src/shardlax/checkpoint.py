"""Checkpoints in the logical layout (orbax): save on any mesh, restore on any other.

A training checkpoint holds, per step, four orbax items:

- ``params``: one array per `nnx.Param`, at its global unpadded shape and
  stored dtype, keyed by its nnx path, in the tree `nnx.state` gives (the
  format a plain flax user writes with `ocp.StandardCheckpointer`);
- ``opt_state``: the optax state in the structure of `tx.init(params)`, each
  leaf that follows a parameter at that parameter's shape;
- ``rest``: the model's other state (batch statistics, RNG keys and counts);
- ``meta``: JSON, the step, the format, and the layout it was saved from (for
  information only: nothing in the arrays depends on the device count or the
  strategy).

So a run saved under zero2 on 8 devices restores under dp, fsdp or fsdp+tp on
4, 2 or 1 (`shardlax._logical` converts on device, each device computing only
its part; orbax writes each shard once and reads into targets that carry the
restoring trainer's shardings, so no host gathers the model).

Saves are asynchronous (orbax's `CheckpointManager`, keeping the last
`max_to_keep` steps) and atomic: a step is written to a temporary directory
and renamed when complete, so a process killed during a save leaves the
earlier steps intact. Multi-process runs (`jax.distributed`) save and restore
with every process writing and reading its own shards.

Example:
  >>> import tempfile
  >>> loss = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
  >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  >>> trainer = shardlax.Trainer(model, optax.adam(1e-3), loss,
  ...                            mesh=shardlax.make_mesh(data=4), strategy="zero2")
  >>> directory = tempfile.mkdtemp()
  >>> trainer.save(directory, trainer.init())
  >>> trainer.wait()
  >>> other = shardlax.Trainer(nnx.Linear(4, 2, rngs=nnx.Rngs(1)), optax.adam(1e-3), loss,
  ...                          mesh=shardlax.make_mesh(data=2), strategy="dp")
  >>> state = other.restore(directory)  # another mesh and strategy
  >>> bool(jnp.array_equal(other.model(state).kernel[...], model.kernel[...]))
  True

  A model alone (a plain orbax checkpoint of `nnx.state(model)`):

  >>> path = tempfile.mkdtemp() + "/model"
  >>> shardlax.checkpoint.save_model(path, model)
  >>> fresh = shardlax.checkpoint.restore_model(path, nnx.Linear(4, 2, rngs=nnx.Rngs(2)))
  >>> bool(jnp.array_equal(fresh.kernel[...], model.kernel[...]))
  True

References:
  orbax-checkpoint, https://orbax.readthedocs.io (CheckpointManager, StandardCheckpointer).
  PyTorch Distributed Checkpoint (torch.distributed.checkpoint): load-time resharding.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from shardlax._checkpoint_dirs import (
    _ARRAY_ITEMS,
    _ORBAX_FILE,
    FORMAT,
    MARKER,
    VERSION,
    _check_restore_root,
    _check_save_root,
    _forget,
    _is_model_checkpoint,
    _is_training_root,
    _manager,
    _pick_step,
    _root,
    _write_marker,
    wait,
    wait_for,
)
from shardlax._checkpoint_read import (
    _abstract_state,
    _checked_restore,
    _corrupt,
    _item_tree,
    _mismatches,
    _raise_mismatch,
    _read_metadata,
    _target,
)
from shardlax._logical import (
    Logical,
    abstract_logical,
    from_logical,
    logical_specs,
    to_logical,
)

#: Steps a `CheckpointManager` keeps by default (the oldest are deleted).
DEFAULT_MAX_TO_KEEP = 3


def all_steps(directory: Any) -> list[int]:
    """The steps a training-checkpoint directory holds (complete ones only), ascending."""
    root = _root(directory)
    _check_restore_root(root, "shardlax.checkpoint.all_steps")
    return sorted(_manager(root, None, create=False).all_steps())


# ------------------------------------------------------------------ save
def _scalar(x: Any) -> int:
    """The value of a replicated scalar, also when it spans processes."""
    if isinstance(x, jax.Array):
        x = x.addressable_data(0)
    return int(np.asarray(x))


def save(
    trainer: Any,
    directory: Any,
    state: Any,
    *,
    step: int | None = None,
    max_to_keep: int | None = DEFAULT_MAX_TO_KEEP,
) -> None:
    """Start saving `state` of `trainer` as step `step` of `directory`; returns at once.

    The arrays are converted to the logical layout on device and copied to
    host memory before this returns (so the step may donate `state` next);
    orbax writes them in the background. `wait()` blocks until written.

    Args:
      trainer: the `shardlax.Trainer` that made `state`.
      directory: the checkpoint directory (created; may hold earlier steps).
      state: a `TrainState` of `trainer`.
      step: the step number to save as; default `state.step`.
      max_to_keep: keep this many most recent steps (None: all).
    """
    where = "Trainer.save"
    root = _root(directory)
    _check_save_root(root, where)
    if step is None:
        step = _scalar(state.step)
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"{where}(step={step!r}): expected a non-negative int step number.")
    step = int(step)
    if not _is_training_root(root):  # new, or deleted since this process last saved there
        _forget(root)
    _write_marker(root)
    manager = _manager(root, max_to_keep, create=True)
    manager.wait_until_finished()
    manager.reload()
    if step in manager.all_steps():
        raise ValueError(
            f"{where}(step={step}): {str(root)!r} already holds step {step}; a checkpoint is "
            f"never overwritten. Pass another step=, or save into a new directory."
        )
    logical = to_logical(trainer, state)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "state_step": _scalar(logical.step),
        "saved_from": {
            "strategy": str(getattr(trainer.strategy, "name", trainer.strategy)),
            "mesh": {str(k): int(v) for k, v in trainer.mesh.shape.items()},
            "processes": jax.process_count(),
        },
    }
    # orbax refuses an item without arrays (a model with no other state, plain sgd):
    # such an item is not written, and restores as the restoring trainer's empty tree
    items = {item: ocp.args.StandardSave(getattr(logical, item)) for item in _ARRAY_ITEMS
             if jax.tree.leaves(getattr(logical, item))}  # fmt: skip
    meta["items"] = sorted(items)
    manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))


# ------------------------------------------------------------------ restore
def restore(trainer: Any, directory: Any, step: int | None = None) -> Any:
    """The `TrainState` saved at `step` (default the latest), laid out for `trainer`.

    Any strategy and mesh may have saved it: orbax reads each leaf straight
    into the shardings of `trainer`'s logical layout (`logical_specs`), then
    zero1/zero2 flatten the optimizer leaves on device. Names, shapes and
    dtypes are checked against the checkpoint first; nothing is restored
    unless everything fits.

    Args:
      trainer: the `shardlax.Trainer` to restore for.
      directory: a directory written by `save`.
      step: the step to restore; None for the latest complete one.

    Returns:
      A `TrainState` laid out as `trainer.state_specs()`.
    """
    where = "Trainer.restore"
    root = _root(directory)
    wait_for(root)
    if not _is_training_root(root):
        _forget(root)
    _check_restore_root(root, where)
    manager = _manager(root, None, create=False)
    manager.reload()
    step = _pick_step(manager, root, step, where)
    abstract = abstract_logical(trainer)
    specs = logical_specs(trainer)
    metadata = _read_metadata(manager, root, step, where)
    targets = {item: _target(getattr(abstract, item), getattr(specs, item), trainer.mesh)
               for item in _ARRAY_ITEMS}  # fmt: skip
    got = _checked_restore(manager, root, step, where, metadata, targets, meta=True)
    meta = got["meta"] or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{where}: step {step} of {str(root)!r} has no shardlax metadata (format "
            f"{meta.get('format')!r}); it was not written by shardlax.checkpoint.save."
        )
    logical = Logical(
        params=got["params"],
        opt_state=got["opt_state"],
        rest=got["rest"],
        step=np.int32(meta["state_step"]),
    )
    return from_logical(trainer, logical)


# ------------------------------------------------------------------ models
def save_model(directory: Any, model: nnx.Pytree, *, force: bool = False) -> None:
    """Save `nnx.state(model)` (any NNX model, sharded or not) to `directory`; blocks until written.

    Any NNX object works the same way, e.g. an `nnx.Optimizer` beside its model.

    The format is exactly what a flax user gets from
    `ocp.StandardCheckpointer().save(directory, nnx.state(model))`: they can
    restore it with orbax alone, and `restore_model` reads theirs. Each
    device writes its own shards; the write is atomic.

    Args:
      directory: a path that does not exist yet (or, with `force=True`, a
        model checkpoint to replace).
      model: the NNX module.
      force: replace an existing checkpoint at `directory`.
    """
    where = "shardlax.checkpoint.save_model"
    if not isinstance(model, nnx.Pytree):
        raise TypeError(f"{where}(model=...): expected a flax.nnx.Module (or nnx.Optimizer), got "
                        f"{type(model).__name__}.")  # fmt: skip
    root = _root(directory)
    if root.exists() and not force:
        raise ValueError(
            f"{where}(directory={str(root)!r}): the path exists; a checkpoint is never "
            f"overwritten silently. Pass a new path, or force=True to replace it."
        )
    if root.exists() and force and not _is_model_checkpoint(root):
        raise ValueError(
            f"{where}(directory={str(root)!r}, force=True): the path exists and is not a "
            f"model checkpoint; refusing to replace it. Pass a new path."
        )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(root, nnx.state(model), force=force)
    checkpointer.wait_until_finished()
    checkpointer.close()


def restore_model(directory: Any, model: nnx.Pytree, *, step: int | None = None) -> nnx.Pytree:
    """Load the saved weights (and other state) into `model`, in `model`'s placement.

    `directory` is a model checkpoint (`save_model`, or a plain
    `ocp.StandardCheckpointer` save of `nnx.state(model)`) or a training
    checkpoint (`Trainer.save`: its parameters and other state at `step`,
    default the latest). Every array is read straight into the sharding the
    model's own arrays have (a plain one-device model gets the whole arrays;
    a `shardlax.nn` model its shards). Names, shapes and dtypes are checked
    first; `model` is updated only when everything was read.

    Returns:
      `model`, updated in place.
    """
    where = "shardlax.checkpoint.restore_model"
    if not isinstance(model, nnx.Pytree):
        raise TypeError(f"{where}(model=...): expected a flax.nnx.Module (or nnx.Optimizer), got "
                        f"{type(model).__name__}.")  # fmt: skip
    root = _root(directory)
    wait_for(root)
    if not root.exists():
        raise FileNotFoundError(
            f"{where}(directory={str(root)!r}): no such directory, so there is no checkpoint "
            f"to restore. Pass the path given to save_model or Trainer.save."
        )
    if _is_training_root(root):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        manager = _manager(root, None, create=False)
        manager.reload()
        step = _pick_step(manager, root, step, where)
        metadata = _read_metadata(manager, root, step, where)
        targets = {"params": _abstract_state(params), "rest": _abstract_state(rest)}
        got = _checked_restore(manager, root, step, where, metadata, targets, meta=False)
        nnx.update(model, got["params"], got["rest"])
        return model
    if not _is_model_checkpoint(root):
        raise ValueError(
            f"{where}(directory={str(root)!r}): not a checkpoint (neither a model checkpoint "
            f"with {_ORBAX_FILE} nor a training checkpoint with {MARKER}). Pass the path "
            f"given to save_model or Trainer.save."
        )
    if step is not None:
        raise ValueError(
            f"{where}(step={step}): {str(root)!r} is a model checkpoint, which has one "
            f"state and no steps. Pass step=None."
        )
    state = nnx.state(model)
    target = _abstract_state(state)
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(root)
    except Exception as err:
        raise _corrupt(where, root, None, [], err) from err
    problems = _mismatches("model", _item_tree(getattr(stored, "item_metadata", stored)), target)
    if problems:
        _raise_mismatch(where, root, None, problems)
    try:
        got = checkpointer.restore(root, target)
    except Exception as err:
        raise _corrupt(where, root, None, [], err) from err
    finally:
        checkpointer.close()
    nnx.update(model, got)
    return model


__all__ = [
    "DEFAULT_MAX_TO_KEEP",
    "Logical",
    "abstract_logical",
    "all_steps",
    "from_logical",
    "logical_specs",
    "restore",
    "restore_model",
    "save",
    "save_model",
    "to_logical",
    "wait",
]
