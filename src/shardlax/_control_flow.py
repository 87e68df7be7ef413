"""The model's own loops and conds, run per device as they run on one device.

Inside a `shard_map` every value is typed with the mesh axes it varies over.
A loop whose initial carry is a constant (`jnp.zeros`, an LSTM's
`initialize_carry`) and whose body mixes in the batch shard returns a carry
that varies over the batch axes, and `lax.scan` / `fori_loop` / `while_loop`
refuse the mismatch; so do `lax.cond` / `switch` when one branch returns a
constant. Model code written for one device (`nnx.RNN`, a decoding loop, a
`cond` with a zeros branch) would fail under every strategy.

While `varying_carries()` is active (the Trainer's step and `fully_shard`
units run the model under it), those functions first run as they are; only
when JAX refuses the types, the carry (branch outputs) is cast, with
`kernels.ensure_varying` (`pcast(..., to='varying')`), to the axes the body makes it vary over: the
fixed point of tracing the body abstractly (`jax.make_jaxpr`, nothing runs).
A cast is what JAX inserts itself when an invariant value meets a varying one
(its transpose sums the cotangent over those axes), so gradients are those of
one device. Casting never adds an axis the body does not vary over.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax import lax

from shardlax import kernels

_ORIG = {name: getattr(lax, name) for name in ("scan", "fori_loop", "while_loop", "cond", "switch")}
_lock = threading.Lock()
_depth = 0

#: the part of JAX's message that says only the varying axes differ
_VMA = "manual axis types do not match"


def _cast(x: Any, axes: frozenset) -> Any:
    missing = tuple(sorted(axes - kernels.varying_axes(x)))
    return kernels.ensure_varying(x, missing) if missing else x


def _cast_tree(tree: Any, targets: list[frozenset]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [_cast(x, t) for x, t in zip(leaves, targets, strict=True)])


def _out_vmas(fn, *args) -> list[frozenset]:
    """The vma of every output leaf of `fn(*args)`, traced abstractly."""
    closed = jax.make_jaxpr(fn)(*args)
    return [frozenset(a.manual_axis_type.varying) for a in closed.out_avals]


def _carry_fixpoint(step, init: Any) -> list[frozenset]:
    """Per carry leaf, the axes it varies over once the loop has run: `step(carry)` returns
    the next carry; the union of in and out until nothing changes (the sets only grow, and
    no larger than the mesh's axes, so this ends)."""
    targets = [kernels.varying_axes(x) for x in jax.tree.leaves(init)]
    while True:
        outs = _out_vmas(lambda c: jax.tree.leaves(step(c)), _cast_tree(init, targets))
        new = [t | o for t, o in zip(targets, outs, strict=True)]
        if new == targets:
            return targets
        targets = new


def _scan(orig, f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    def step(c):  # one iteration, on the first slice of xs (traced abstractly)
        return f(c, jax.tree.map(lambda x: x[-1 if reverse else 0], xs))[0]

    targets = _carry_fixpoint(step, init)

    def body(c, x):
        c2, y = f(c, x)
        return _cast_tree(c2, targets), y

    return orig(
        body, _cast_tree(init, targets), xs, length=length, reverse=reverse, unroll=unroll, **kw
    )


def _fori_loop(orig, lower, upper, body_fun, init_val, **kw):
    targets = _carry_fixpoint(lambda c: body_fun(lower, c), init_val)

    def body(i, c):
        return _cast_tree(body_fun(i, c), targets)

    return orig(lower, upper, body, _cast_tree(init_val, targets), **kw)


def _while_loop(orig, cond_fun, body_fun, init_val):
    targets = _carry_fixpoint(body_fun, init_val)

    def body(c):
        return _cast_tree(body_fun(c), targets)

    return orig(cond_fun, body, _cast_tree(init_val, targets))


def _joined(branches, operands) -> list:
    """`branches` whose outputs are cast to the union of every branch's output vma."""
    outs = [_out_vmas(b, *operands) for b in branches]
    targets = [functools.reduce(frozenset.union, leaf) for leaf in zip(*outs, strict=True)]

    def wrap(b):
        return lambda *ops: _cast_tree(b(*ops), targets)

    return [wrap(b) for b in branches]


def _cond(orig, pred, true_fun, false_fun, *operands, **kw):
    return orig(pred, *_joined([true_fun, false_fun], operands), *operands, **kw)


def _switch(orig, index, branches, *operands, **kw):
    return orig(index, _joined(list(branches), operands), *operands, **kw)


def _tolerant(name: str, cast):
    """`jax.lax.<name>` as it is; where JAX refuses only the varying axes, `cast(orig, ...)`."""
    orig = _ORIG[name]

    @functools.wraps(orig)
    def call(*args, **kwargs):
        try:
            return orig(*args, **kwargs)
        except TypeError as e:
            if _VMA not in str(e):
                raise
        return cast(orig, *args, **kwargs)

    return call


_TOLERANT = {
    name: _tolerant(name, cast)
    for name, cast in [("scan", _scan), ("fori_loop", _fori_loop), ("while_loop", _while_loop),
                       ("cond", _cond), ("switch", _switch)]
}  # fmt: skip


@contextlib.contextmanager
def varying_carries() -> Iterator[None]:
    """While active, `jax.lax.scan` / `fori_loop` / `while_loop` / `cond` / `switch` cast a
    carry (branch outputs) to the varying axes the body gives it, where JAX refuses it."""
    global _depth
    with _lock:
        if _depth == 0:
            for name, fn in _TOLERANT.items():
                setattr(lax, name, fn)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, fn in _ORIG.items():
                    setattr(lax, name, fn)
