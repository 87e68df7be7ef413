"""Sharding-invariant dropout: the same mask on every mesh, and the same as nnx.Dropout."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.nn._base import run_shard_map
from shardlax.nn._sequence import SequenceLayer


def draw_key(rngs, rng_collection: str):
    """The key a dropout draws from `rngs` as `nnx.Dropout` does (an `nnx.Rngs` stream is
    advanced by one), or None when `rngs` is none of `Rngs`, `RngStream`, `jax.Array`."""
    if isinstance(rngs, rnglib.Rngs):
        return rngs[rng_collection]()
    if isinstance(rngs, rnglib.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    return None


class Dropout(SequenceLayer):
    """`nnx.Dropout` whose mask depends on the key and each element's global position only.

    The keep bit of element `i` (its row-major index in the global array) is
    `uniform(threefry(key, i)) < 1 - rate`, the bit `jax.random.bernoulli`
    draws for it on one device. Each device computes the indices of its own
    shard from `axis_index` offsets, so the output is bit-identical on every
    mesh shape, under any layout, and to `nnx.Dropout` with the same key
    (`jax_threefry_partitionable=True`, the JAX default). Folding the device
    index into the key, the usual recipe, gives a different mask per mesh.

    No collectives, forward or backward. Same constructor and call signature
    as `nnx.Dropout`, plus `mesh`, `axis_name`, `batch_axes`,
    `sequence_parallel` (the default layout of the input) and, at call time,
    `spec` to give any other layout of the input.

    References:
      Srivastava et al., "Dropout", JMLR 2014; Salmon et al., "Parallel Random
      Numbers: As Easy as 1, 2, 3", SC 2011.
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: rnglib.Rngs | rnglib.RngStream | None = None,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Dropout(rate={rate}): rate must be in [0, 1]. Pass e.g. rate=0.1.")
        self.rate = rate
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.sequence_parallel = sequence_parallel
        if isinstance(rngs, rnglib.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, rnglib.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(
                f"Dropout(rngs={type(rngs).__name__}): expected nnx.Rngs, nnx.RngStream or None."
            )
        if self.rngs is not None:
            # the stream's key and count live replicated on the mesh, where a jitted
            # step returns them: the second nnx.jit call then hits the cache
            for var in (self.rngs.key, self.rngs.count):
                var.set_value(jax.device_put(var[...], NamedSharding(self.mesh, P())))

    def set_view(self, deterministic: bool | None = None):
        """Used by `nnx.view(model, deterministic=...)`, as `nnx.Dropout.set_view`.

        Args:
          deterministic: if True, disables dropout masking.
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None,
        spec: P | None = None,
    ) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            owner = type(self).__name__
            deterministic = self.deterministic if deterministic is None else deterministic
            if deterministic is None:
                raise ValueError(
                    f"{owner}: no `deterministic` given. Pass deterministic=True/False to the "
                    f"constructor or the call."
                )
            if self.rate == 0.0 or deterministic:
                return inputs
            if self.rate == 1.0:
                return jnp.zeros_like(inputs)
            rngs = self.rngs if rngs is None else rngs
            if rngs is None:  # ValueError, as nnx.Dropout (flax's first_from)
                raise ValueError(
                    f"{owner}: `deterministic` is False, but no `rngs` argument was provided "
                    f"to Dropout as either a __call__ argument or class attribute. Pass "
                    f"rngs=nnx.Rngs(dropout=0) to the constructor or a key to the call."
                )
            key = draw_key(rngs, self.rng_collection)
            if key is None:
                raise TypeError(
                    f"{owner}: `deterministic` is False but no rngs were given (got "
                    f"{type(rngs).__name__}). Pass rngs=nnx.Rngs(dropout=0) to the constructor "
                    f"or a key to the call."
                )
            if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.key_data(key)
            if spec is None:
                self._check_hidden(inputs, None, "inputs")
                spec = self.hidden_spec(inputs.ndim)
            inputs = self._place(inputs, spec)
            key = self._place(key, P(None))
            global_shape = tuple(inputs.shape)
            entries = tuple(spec) + (None,) * (inputs.ndim - len(spec))

            def body(x, key_data):
                return kernels.sharding_invariant_dropout(
                    x, key_data, rate=self.rate, global_shape=global_shape, spec=entries,
                    broadcast_dims=self.broadcast_dims,
                )  # fmt: skip

            return run_shard_map(body, self.mesh, (inputs, key), (spec, P(None)), spec)

    def declared_collectives(self, *args, **kwargs) -> list:
        """None, forward or backward."""
        return []
