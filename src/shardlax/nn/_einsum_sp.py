"""What `ParallelEinsum(sequence_parallel=True)` checks: the split fits SP, the input's dim 1 is
a sequence, and (inside the Trainer's step) the input is this device's sequence shard."""

from __future__ import annotations

from typing import Any

from shardlax.nn._linear import check_sequence_shard


def check_split(layer: Any, einsum_str: str, subs: tuple[str, str, str], dim: int) -> None:
    """A batched split (the split letter in the input and the output) cannot also split the
    sequence over the model axis."""
    xs, ks, out = subs
    c = ks[dim]
    if c in xs and c in out:
        raise ValueError(
            f"{type(layer).__name__}({einsum_str!r}, shard_dim={dim}, sequence_parallel=True):"
            f" the split letter {c!r} is in the input and the output (a batched split: the "
            f"input is already split on it over mesh axis {layer.axis_name!r}), so the "
            f"sequence cannot be split there too. Pass sequence_parallel=False."
        )


def check_sequence(
    layer: Any, inputs: Any, einsum_str: str, subs: tuple[str, str, str], manual: bool
) -> None:
    """One call's input under SP: dim 1 is a sequence letter, divisible by the model axis."""
    xs, ks, out = subs
    owner, n, c = type(layer).__name__, layer.model_size, ks[layer.shard_dim]
    check_split(layer, einsum_str, subs, layer.shard_dim)
    s = xs[1] if len(xs) > 1 else None
    if s is None or s in ks or s not in out or s == layer._batch_letter(xs, ks, out):
        raise ValueError(
            f"{owner}({einsum_str!r}, sequence_parallel=True): sequence parallelism splits "
            f"the input's dim 1 (the sequence) over mesh axis {layer.axis_name!r}, so it must "
            f"be a letter of the input and the output that the kernel lacks, after the "
            f"batch; got {s!r} in {xs!r} -> {out!r}. Write the input as [batch, sequence, "
            f"...], or pass sequence_parallel=False."
        )
    if c in out and c not in xs:  # column-like: the input is this device's sequence shard
        check_sequence_shard(owner, inputs, layer.mesh, layer.axis_name)
    if not manual and inputs.shape[1] % n:
        raise ValueError(
            f"{owner}(sequence_parallel=True): inputs.shape[1]={inputs.shape[1]} (the "
            f"sequence) cannot be sharded over mesh axis {layer.axis_name!r} (size {n}): {n} "
            f"does not divide {inputs.shape[1]}. Use a sequence length divisible by {n}, or "
            f"sequence_parallel=False."
        )
