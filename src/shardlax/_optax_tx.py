"""The optax transformation as shardlax runs it, and the global norm it traces as one call.

`normalize_tx` turns what users pass (any `GradientTransformation`,
`optax.MultiSteps`) into the transformation to run; `_marked_norm` swaps
optax's and `shardlax.zero`'s global norms for `_shardlax_global_norm`, one
marked call that `shardlax._jaxpr_check` knows by its name.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import optax

from shardlax import kernels, zero


# ------------------------------------------------------------------- tx forms
def normalize_tx(tx: Any, owner: str = "Trainer") -> optax.GradientTransformation:
    """The `GradientTransformation` to run for `tx` as users pass it.

    Accepts any `optax.GradientTransformation` (including
    `GradientTransformationExtraArgs`, returned as is) and `optax.MultiSteps`
    objects (their `.gradient_transformation()`).

    Raises:
      TypeError: for anything else, naming `owner`.
    """
    if isinstance(tx, optax.MultiSteps):
        return tx.gradient_transformation()
    if isinstance(tx, optax.GradientTransformation):
        return tx
    raise TypeError(
        f"{owner}(tx={tx!r}): expected an optax.GradientTransformation or optax.MultiSteps, "
        f"got {type(tx).__name__}. Pass e.g. optax.adamw(1e-3)."
    )


# ------------------------------------------------------------ the global norm
# (`_jaxpr_check` knows the marked norm by this function name, `_NORM_NAME`)
@functools.partial(jax.jit, static_argnames=("ord", "squared"))
def _shardlax_global_norm(tree, ord=None, squared=False):
    return kernels.sharded_tree_norm(tree, ord=ord, squared=squared)


@contextlib.contextmanager
def _marked_norm(norm=_shardlax_global_norm, optax_norm: bool = True, zero_norm: bool = True):
    """The exact global norms as one marked call each: `shardlax.zero`'s own (always exact
    on shards; not when `norm` itself calls it) and, with `optax_norm` (what
    `zero.global_norm_hook` replaces), optax's."""
    targets = [(zero, "_norm")] if zero_norm else []
    if optax_norm:
        targets += zero.optax_norm_targets()
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]
    try:
        for mod, name in targets:
            setattr(mod, name, norm)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


__all__ = ["normalize_tx"]
