"""Whether an FSDP gather is being traced inside a checkpointed loop step (no collectives here).

`fsdp_call` (`_fsdp.py`) reads `inside_checkpoint()` to drop its re-gather
where the backward already recomputes the gather; shardlax's shard_map
entry points wrap their calls in `call_site_of_shard_map()`, since a
shard_map body's trace stack does not reach its caller's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

#: Whether the call site of the shard_map being traced is inside a checkpoint (its body's
#: own trace stack starts afresh, so `call_site_of_shard_map` carries the answer in).
_CALL_SITE_IN_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "shardlax_call_site_in_checkpoint", default=False
)


def inside_checkpoint() -> bool:
    """True while tracing the body of a `jax.checkpoint` (`nnx.remat`) that is a loop's step.

    A checkpointed step of a `lax.scan` (the scan-over-layers pattern) is
    re-run in the backward loop, gather included, so its backward already
    holds the gathered parameters the recomputation made: `fsdp_call` then
    keeps them as plain residuals (they live only inside that step of the
    backward loop) instead of gathering a third time. Outside a loop the
    recomputation sits in the same program as the forward, and XLA:CPU
    merges its gather into the forward's (measured: the gathered parameters
    then live for the whole step), so there the re-gather tied to the
    cotangent stays. Read from JAX's trace stack (each staging trace knows
    its parent and what it traces for); a differentiation that starts
    inside (`jax.grad` under the checkpoint) ends the search, as the
    re-gather then serves that backward. A `shard_map` body's stack starts
    afresh: the layers' and units' shard_map calls carry their call site's
    answer in (`call_site_of_shard_map`).
    """
    try:
        from jax._src import core
        from jax._src.interpreters import ad
        from jax._src.interpreters import partial_eval as pe
    except ImportError:  # pragma: no cover - another JAX: resharded as asked
        return False
    trace, checkpointed = core.trace_ctx.trace, False
    for _ in range(10_000):  # the stack is finite; the bound only guards a cycle
        if isinstance(trace, ad.JVPTrace | ad.LinearizeTrace):
            return False
        if isinstance(trace, pe.DynamicJaxprTrace):
            info = getattr(getattr(trace, "frame", None), "debug_info", None)
            what = getattr(info, "traced_for", None)  # None on a JAX that moved it: resharded
            if what == "checkpoint / remat":
                checkpointed = True
            elif checkpointed and what in _LOOP_BODIES:
                return True
        parent = getattr(trace, "parent_trace", None)
        if parent is None:
            break
        trace = parent
    return _CALL_SITE_IN_CHECKPOINT.get()


#: What JAX's loops trace their steps for (`DebugInfo.traced_for`).
_LOOP_BODIES = frozenset({"scan", "while_body", "while_loop", "fori_loop"})


@contextlib.contextmanager
def call_site_of_shard_map() -> Iterator[None]:
    """Around a `jax.shard_map` call: its body sees `inside_checkpoint()` of the call site."""
    token = _CALL_SITE_IN_CHECKPOINT.set(inside_checkpoint())
    try:
        yield
    finally:
        _CALL_SITE_IN_CHECKPOINT.reset(token)
