"""`nnx.Einsum` with one named kernel dim split over the model axis (heads, hidden units)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import MODEL
from shardlax.declarations import Declared, Role
from shardlax.mesh import is_manual
from shardlax.nn._base import ShardedLayer, nbytes, param_value
from shardlax.nn._projection import _identity, metadata_param, shared_model_input
from shardlax.placement import storage_spec


class ParallelEinsum(ShardedLayer):
    """`nnx.Einsum` whose kernel is split over the model axis on its dim `shard_dim`.

    The kernel keeps its global shape and layout (a `(heads, d_model,
    head_dim)` kernel stays that, split on the heads): no re-layout, so the
    checkpoint is the one `nnx.Einsum` writes. The split letter `c =
    kernel_subscripts[shard_dim]` decides the parallelism:

    - column-like, `c` in the output (``'BTD,DNH->BTNH'`` split on N): the
      input is replicated over the model axis, the output comes out split on
      `c`. Forward: no collective. Backward: 1 all-reduce of dx over the
      model axis, once per shared input (every column layer that reads the
      same activation shares it, see `shared_model_input`).
    - row-like, `c` contracted (``'BTNH,NHD->BTD'`` split on N): the input
      arrives split on `c`, the partial products are summed with 1
      all-reduce of the output forward; backward none for dx.

    The batch (the input's first letter, when it is not a kernel letter) is
    split over the batch axes; the parameter gradients are all-reduced over
    them. The bias is broadcast as `nnx.Einsum` does; when column-like it is
    split on `c` too, which needs `bias_shape` to list the output's kernel
    dims in output order (e.g. `(N, H)` for ``'BTD,DNH->BTNH'``).

    Args are those of `nnx.Einsum`, plus:
      shard_dim: the kernel dim split over the model axis (negative counts
        from the end).
      mesh, axis_name, batch_axes: as `ColumnParallelLinear`.

    Manual mode (inside a shard_map over the whole mesh): the kernel is the
    local shard and the activation dims split over the model axis have their
    local sizes.
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        dtype: Any | None = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = default_bias_init,
        promote_dtype: Any = dtypes.promote_dtype,
        einsum_op: Any = jnp.einsum,
        preferred_element_type: Any | None = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        shard_dim: int = -1,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        owner = type(self).__name__
        einsum_str = einsum_str.replace(" ", "")
        kernel_shape = tuple(int(d) for d in kernel_shape)
        xs, ks, out = _parse(owner, einsum_str, kernel_shape)
        nd = len(kernel_shape)
        if not isinstance(shard_dim, int) or not -nd <= shard_dim < nd:
            raise ValueError(
                f"{owner}(shard_dim={shard_dim!r}): the kernel of shape {kernel_shape} has "
                f"{nd} dims; pass a dim in [-{nd}, {nd})."
            )
        shard_dim %= nd
        c = ks[shard_dim]
        if (c in out) == (c in xs):
            where = "the input and the output" if c in out else "neither input nor output"
            raise ValueError(
                f"{owner}({einsum_str!r}, shard_dim={shard_dim}): kernel letter {c!r} appears "
                f"in {where}; a split dim must be either an output dim only (column-like: "
                f"heads, hidden units) or contracted with the input (row-like). Choose "
                f"shard_dim among {[i for i, k in enumerate(ks) if (k in out) != (k in xs)]}."
            )
        n = self.model_size
        if kernel_shape[shard_dim] % n:
            raise ValueError(
                f"{owner}(kernel_shape={kernel_shape}, shard_dim={shard_dim}) cannot be sharded "
                f"over mesh axis {axis_name!r} (size {n}): {n} does not divide "
                f"{kernel_shape[shard_dim]} (letter {c!r} of {einsum_str!r}). Choose a size "
                f"divisible by {n}, or a mesh whose {axis_name!r} size divides it."
            )
        self.column = c in out
        model = self._spec_axis(axis_name)
        self.kernel_spec = storage_spec(nd, [(shard_dim, model)])
        self.bias_spec = P()
        if bias_shape is not None:
            bias_shape = tuple(int(d) for d in bias_shape)
            if self.column:
                want = tuple(kernel_shape[ks.index(k)] for k in out if k in ks)
                if bias_shape != want:
                    raise ValueError(
                        f"{owner}(bias_shape={bias_shape}): a column-like split of letter "
                        f"{c!r} splits the bias too, so bias_shape must list the output's "
                        f"kernel dims in output order, {want}. Pass bias_shape={want}."
                    )
                where = [k for k in out if k in ks].index(c)
                self.bias_spec = storage_spec(len(want), [(where, model)])
        kmeta = dict(kernel_metadata or {})
        bmeta = dict(bias_metadata or {})
        self.kernel = metadata_param(
            kernel_init, rngs.params(), kernel_shape, param_dtype, self.mesh, self.kernel_spec,
            kmeta,
        )  # fmt: skip
        self.bias: nnx.Param | None
        if bias_shape is not None:
            self.bias = metadata_param(
                bias_init, rngs.params(), bias_shape, param_dtype, self.mesh, self.bias_spec,
                bmeta,
            )  # fmt: skip
        else:
            self.bias = nnx.data(None)
        self.einsum_str = einsum_str
        self.kernel_shape = kernel_shape
        self.bias_shape = bias_shape
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.einsum_op = einsum_op
        self.preferred_element_type = preferred_element_type
        self.shard_dim = shard_dim
        self.split_letter = c

    # ------------------------------------------------------------------ layout

    def _batch_letter(self, xs: str, ks: str, out: str) -> str | None:
        b = xs[0] if len(xs) > 1 else None
        return b if b is not None and b not in ks and b in out else None

    def _spec(self, subs: str, batch: str | None, model_letter: str | None) -> P:
        model = self._spec_axis(self.axis_name)
        entries = []
        for k in subs:
            if k == batch:
                entries.append(self._batch_entry())
            elif k == model_letter:
                entries.append(model)
            else:
                entries.append(None)
        return P(*entries)

    def input_spec(self, einsum_str: str | None = None) -> P:
        xs, ks, out = _letters(einsum_str or self.einsum_str)
        b = self._batch_letter(xs, ks, out)
        return self._spec(xs, b, None if self.column else self.split_letter)

    def output_spec(self, einsum_str: str | None = None) -> P:
        xs, ks, out = _letters(einsum_str or self.einsum_str)
        b = self._batch_letter(xs, ks, out)
        return self._spec(out, b, self.split_letter if self.column else None)

    def _check(self, inputs: jax.Array, einsum_str: str) -> None:
        owner = type(self).__name__
        if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
            raise TypeError(f"{owner}: inputs must be an array, got {type(inputs).__name__}.")
        xs, ks, out = _parse(owner, einsum_str, self.kernel_shape)
        if ks[self.shard_dim] != self.split_letter:
            raise ValueError(
                f"{owner}(einsum_str={einsum_str!r}): the kernel letter of the split dim "
                f"{self.shard_dim} is {ks[self.shard_dim]!r}, but this layer splits "
                f"{self.split_letter!r} ({self.einsum_str!r}). Keep the split letter at the "
                f"same kernel dim."
            )
        if inputs.ndim != len(xs):
            raise ValueError(
                f"{owner}({einsum_str!r}): inputs.shape={tuple(inputs.shape)} has rank "
                f"{inputs.ndim}, the equation's input {xs!r} has rank {len(xs)}."
            )
        manual = is_manual(self.mesh)
        n = self.model_size
        b = self._batch_letter(xs, ks, out)
        for i, k in enumerate(xs):
            if k not in ks:
                continue
            want = self.kernel_shape[ks.index(k)]
            local = want // n if (manual and k == self.split_letter) else want
            if inputs.shape[i] != local:
                raise ValueError(
                    f"{owner}({einsum_str!r}, kernel_shape={self.kernel_shape}): inputs.shape"
                    f"[{i}]={inputs.shape[i]} (letter {k!r}) must equal the kernel's {local}"
                    f"{' (its local shard: manual mode)' if local != want else ''}."
                )
        if b is not None and not manual and inputs.shape[0] % self.batch_size_divisor:
            m = self.batch_size_divisor
            raise ValueError(
                f"{owner}: inputs.shape[0]={inputs.shape[0]} (the batch) cannot be sharded over "
                f"mesh axes {self.batch_axes} (size {m}): {m} does not divide "
                f"{inputs.shape[0]}. Use a batch size divisible by {m}."
            )

    # -------------------------------------------------------------------- call

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
            self._check(inputs, einsum_str)
            x_spec = self.input_spec(einsum_str)
            source, inputs = inputs, self._place(inputs, x_spec)
            arg, arg_spec, unwrap = inputs, x_spec, _identity
            if self.column:
                arg, arg_spec, unwrap = shared_model_input(self, source, inputs, x_spec)

            def body(x, kernel, bias):
                kernel, bias = self._replicated_for_grad(kernel, bias)
                x, kernel, bias = self.promote_dtype((unwrap(x), kernel, bias), dtype=self.dtype)
                return kernels.parallel_einsum(
                    einsum_str, x, kernel, bias, split=self.split_letter,
                    axis_name=self.axis_name, precision=self.precision,
                    einsum_op=self.einsum_op,
                    preferred_element_type=self.preferred_element_type,
                )  # fmt: skip

            y = self._shard_map(
                body,
                (arg, self.kernel[...], param_value(self.bias)),
                (arg_spec, self.kernel_spec, self.bias_spec),
                self.output_spec(einsum_str),
            )
            if out_sharding is not None:
                y = self._place(y, getattr(out_sharding, "spec", out_sharding))
            return y

    def declared_collectives(
        self, input_shape: Sequence[int], *, dtype: Any = None, grad: bool = False,
        input_grad: bool = True, einsum_str: str | None = None,
    ) -> list[Declared]:  # fmt: skip
        """The collectives of one call on a global input of `input_shape`.

        Column-like: backward 1 all-reduce of dx over the model axis (once per
        shared input: declare it for one reader of an activation). Row-like:
        forward 1 all-reduce of the output. With `grad`, 1 all-reduce per
        parameter over the batch axes.
        """
        einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
        dtype = dtype or self.dtype or self.param_dtype
        xs, ks, out = _letters(einsum_str)
        sizes = dict(zip(xs, input_shape, strict=True))
        sizes.update(zip(ks, self.kernel_shape, strict=True))
        b = self._batch_letter(xs, ks, out)
        if b is not None:
            sizes[b] //= self.batch_size_divisor
        m = (self.axis_name,)
        res = []
        if self.column:
            if grad and input_grad:
                x_local = [sizes[k] for k in xs]
                res += self._declare("all-reduce", m, dtype, nbytes(x_local, dtype), "dx")
        else:
            y = [sizes[k] for k in out]
            res += self._declare("all-reduce", m, dtype, nbytes(y, dtype), "sum of partials")
        if grad:
            n = self.model_size
            pd = self.param_dtype
            k_local = list(self.kernel_shape)
            k_local[self.shard_dim] //= n
            res += self._declare("all-reduce", self.batch_axes, pd, nbytes(k_local, pd), "dW",
                                 role=Role.GRAD_REDUCE, param="kernel")  # fmt: skip
            if self.bias_shape is not None:
                bl = list(self.bias_shape)
                if self.column:
                    where = [k for k in out if k in ks].index(self.split_letter)
                    bl[where] //= n
                res += self._declare("all-reduce", self.batch_axes, pd, nbytes(bl, pd), "db",
                                     role=Role.GRAD_REDUCE, param="bias")  # fmt: skip
        return res


def _parse(owner: str, einsum_str: str, kernel_shape: Sequence[int]) -> tuple[str, str, str]:
    """The (input, kernel, output) subscripts, with the checks nnx.Einsum makes (ValueError)."""
    if "->" not in einsum_str:
        raise ValueError(
            f'{owner}: `einsum_str` equation must be explicit and include "->", got {einsum_str!r}.'
        )
    if einsum_str.count(",") != 1:
        raise ValueError(
            f"{owner}: `einsum_str` equation must have exactly two operands and therefore, "
            f"exactly one comma character, instead of {einsum_str.count(',')} ({einsum_str!r})."
        )
    if "." in einsum_str:
        raise ValueError(
            f"{owner}({einsum_str!r}): ellipses are not supported by the parallel einsum; "
            f"name every dim with a letter (e.g. 'BTD,DF->BTF')."
        )
    xs, ks, out = _letters(einsum_str)
    if len(ks) != len(kernel_shape):
        raise ValueError(
            f"{owner}({einsum_str!r}, kernel_shape={tuple(kernel_shape)}): the kernel "
            f"subscripts {ks!r} name {len(ks)} dims, the kernel has {len(kernel_shape)}."
        )
    return xs, ks, out


def _letters(einsum_str: str) -> tuple[str, str, str]:
    lhs, out = einsum_str.split("->")
    x, k = lhs.split(",")
    return x, k, out
