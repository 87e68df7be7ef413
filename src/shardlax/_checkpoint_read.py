"""Reading checkpoint items safely: restore targets, fit checks, damaged-file errors.

Before orbax reads anything, every item's stored names, shapes and dtypes
(its metadata tree) are compared with the restore target's, and all the
differences are reported at once; an error orbax or tensorstore raises on
a damaged file becomes one `ValueError` naming the step and the other steps
to try. Shared by `shardlax.checkpoint`'s training and model restores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(item: str, path: tuple[str, ...]) -> str:
    parts = list(path)
    if parts and parts[-1] == "value":  # nnx.Variable's value
        parts = parts[:-1]
    return ".".join([item, *parts]) if parts else item


def _describe(shape: Any, dtype: Any) -> str:
    return f"{np.dtype(dtype).name}[{','.join(map(str, shape))}]"


def _stored_form(x: Any) -> tuple[tuple[int, ...], Any]:
    """How orbax stores a leaf: PRNG keys as their uint32 key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(x.shape), np.dtype(x.dtype)


def _flat_paths(tree: Any, is_leaf=None) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {tuple(_key_str(k) for k in path): x for path, x in leaves}


def _mismatches(item: str, stored: Any, target: Any) -> list[str]:
    """Differences between a checkpoint item's metadata tree and a target tree."""

    def is_meta(x):
        return hasattr(x, "shape") and hasattr(x, "dtype")

    have = _flat_paths(stored, is_leaf=is_meta)
    want = _flat_paths(target)
    out = []
    for path in sorted(set(have) | set(want)):
        name = _path_str(item, path)
        if path not in want:
            s = have[path]
            out.append(f"{name}: in the checkpoint ({_describe(s.shape, s.dtype)}), not in "
                       f"the model")  # fmt: skip
            continue
        shape, dtype = _stored_form(want[path])
        if path not in have:
            out.append(f"{name}: in the model ({_describe(shape, dtype)}), not in the checkpoint")
            continue
        s = have[path]
        if tuple(s.shape) != shape or np.dtype(s.dtype) != dtype:
            out.append(f"{name}: checkpoint {_describe(s.shape, s.dtype)}, model "
                       f"{_describe(shape, dtype)}")  # fmt: skip
    return out


def _raise_mismatch(where: str, root: Path, step: int | None, problems: list[str]) -> None:
    at = f"{str(root)!r}" + ("" if step is None else f" (step {step})")
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
        f"{where}: the checkpoint at {at} does not fit the model ({len(problems)} "
        f"difference(s)); nothing was restored:\n  {shown}{more}\nRestore into a model "
        f"(and optimizer) with the parameter names, shapes and dtypes it was saved with."
    )


def _target(abstract: Any, specs: Any, mesh: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, s)
        ),
        abstract,
        specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )


def _abstract_state(state: Any) -> Any:
    """Restore targets for `state`: its shapes, dtypes and shardings."""

    def target(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(target, state)


def _corrupt(
    where: str, root: Path, step: int | None, steps: list[int], err: Exception
) -> ValueError:
    others = [s for s in steps if s != step]
    fix = f"Restore another step ({others})" if others else "Save it again"
    what = f"step {step} of {str(root)!r}" if step is not None else f"{str(root)!r}"
    return ValueError(
        f"{where}: {what} could not be read, the checkpoint is incomplete or damaged "
        f"({type(err).__name__}: {str(err)[:300]}). Nothing was restored. {fix}."
    )


def _item_metadata(metadata: Any, item: str) -> Any:
    try:
        found = metadata[item]
    except (KeyError, TypeError):
        return {}
    return _item_tree(found)


def _checked_restore(manager, root, step, where, metadata, targets, *, meta: bool) -> dict:
    """Check every item against the checkpoint's metadata, then read them all (or raise)."""
    problems = []
    for item, t in targets.items():
        problems += _mismatches(item, _item_metadata(metadata, item), t)
    if problems:
        _raise_mismatch(where, root, step, problems)
    # items without arrays were not written (see save): they restore as the empty target
    full = {k: t for k, t in targets.items() if jax.tree.leaves(t)}
    args = {k: ocp.args.StandardRestore(t) for k, t in full.items()}
    if meta:
        args["meta"] = ocp.args.JsonRestore()
    try:
        got = dict(manager.restore(step, args=ocp.args.Composite(**args)))
    except Exception as err:  # orbax/tensorstore raise many kinds on damaged files
        raise _corrupt(where, root, step, sorted(manager.all_steps()), err) from err
    return {**targets, **{k: got[k] for k in args}}


def _read_metadata(manager: ocp.CheckpointManager, root: Path, step: int, where: str) -> Any:
    try:
        return manager.item_metadata(step)
    except Exception as err:
        raise _corrupt(where, root, step, sorted(manager.all_steps()), err) from err


def _item_tree(metadata: Any) -> Any:
    tree = getattr(metadata, "tree", metadata)
    return {} if tree is None else tree
