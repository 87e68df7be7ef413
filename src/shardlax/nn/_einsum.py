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
from shardlax.mesh import is_manual, live_axes
from shardlax.nn._base import ShardedLayer, nbytes, param_value
from shardlax.nn._einsum_sp import check_sequence, check_split
from shardlax.nn._projection import _identity, metadata_param, shared_model_input
from shardlax.placement import storage_spec


class ParallelEinsum(ShardedLayer):
    """`nnx.Einsum` whose kernel is split over the model axis on its dim `shard_dim`.

    The kernel keeps its global shape and layout (a `(heads, d_model,
    head_dim)` kernel stays that, split on the heads): no re-layout, so the
    checkpoint is the one `nnx.Einsum` writes. What the split letter `c` (the
    kernel's letter at `shard_dim`) is in the equation decides the
    parallelism, call by call:

    - column-like, `c` in the output only (``'BTD,DNH->BTNH'`` split on N):
      the input is replicated over the model axis, the output comes out split
      on `c`. Forward: no collective. Backward: 1 all-reduce of dx over the
      model axis, once per shared input (every column layer that reads the
      same activation shares it, see `shared_model_input`).
    - batched, `c` in the input and the output (``'BTNH,NHK->BTNK'`` split on
      N): input and output are split on `c`; no collective forward or
      backward.
    - row-like, `c` contracted (``'BTNH,NHD->BTD'`` split on N): the input
      arrives split on `c`, the partial products are summed with 1
      all-reduce of the output forward; backward none for dx (when `c` is a
      kernel-only letter the input is replicated and dx is all-reduced once).

    Sequence parallelism (`sequence_parallel=True`, Megatron-SP): the
    activations outside the split span are split over the sequence (the
    input's dim 1, a letter the output keeps and the kernel lacks) on the
    model axis. Column-like: the input arrives `[B, S/N, ...]`, forward 1
    all-gather of it over the sequence, backward 1 reduce-scatter of dx (no
    dx all-reduce). Row-like: the partial products leave with 1
    reduce-scatter over the sequence instead of the all-reduce (backward 1
    all-gather of dy); the bias's gradient is summed over the model axis
    too (its tokens are split there). Batched splits refuse it (the input is
    already split on the split letter).

    Equations are those of `nnx.Einsum`, ellipses included: they are read as
    flax reads them (opt_einsum's parser), and `shard_dim` may name a dim of
    the kernel's ellipsis. The batch (the input's first letter, when it is
    not a kernel letter) is split over the batch axes; the parameter
    gradients are all-reduced over them. The bias is broadcast as
    `nnx.Einsum` does; when `c` is an output letter it is split on `c` too,
    which needs `bias_shape` to list the output's kernel dims in output order
    (e.g. `(N, H)` for ``'BTD,DNH->BTNH'``).

    Args are those of `nnx.Einsum`, plus:
      shard_dim: the kernel dim split over the model axis (negative counts
        from the end). `None` (the default): the last kernel dim the model
        axis size divides (with one device on the axis, the last dim).
      mesh, axis_name, batch_axes: as `ColumnParallelLinear`.
      sequence_parallel: see above.

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
        shard_dim: int | None = None,
        mesh: Mesh | None = None,
        axis_name: str = MODEL,
        batch_axes: Sequence[str] | None = None,
        sequence_parallel: bool = False,
    ):
        self._setup_mesh(mesh, axis_name, batch_axes)
        owner = type(self).__name__
        einsum_str = einsum_str.replace(" ", "")
        kernel_shape = tuple(int(d) for d in kernel_shape)
        if isinstance(bias_shape, int):
            bias_shape = (bias_shape,)
        _, ks, out = _parse(owner, einsum_str, kernel_shape)
        nd = len(kernel_shape)
        n = self.model_size
        if shard_dim is None:
            fits = [d for d in range(nd) if kernel_shape[d] % n == 0]
            if not fits:
                raise ValueError(
                    f"{owner}(kernel_shape={kernel_shape}) cannot be sharded over mesh axis "
                    f"{axis_name!r} (size {n}): {n} divides none of its dims. Choose kernel "
                    f"sizes divisible by {n}, or a mesh whose {axis_name!r} size divides one."
                )
            shard_dim = fits[-1]
        if not isinstance(shard_dim, int) or not -nd <= shard_dim < nd:
            raise ValueError(
                f"{owner}(shard_dim={shard_dim!r}): the kernel of shape {kernel_shape} has "
                f"{nd} dims; pass a dim in [-{nd}, {nd})."
            )
        shard_dim %= nd
        c = ks[shard_dim]
        if kernel_shape[shard_dim] % n:
            raise ValueError(
                f"{owner}(kernel_shape={kernel_shape}, shard_dim={shard_dim}) cannot be sharded "
                f"over mesh axis {axis_name!r} (size {n}): {n} does not divide "
                f"{kernel_shape[shard_dim]} (kernel dim {shard_dim} of {einsum_str!r}). Choose "
                f"a size divisible by {n}, another shard_dim, or a mesh whose {axis_name!r} "
                f"size divides it."
            )
        self.column = c in out  # the output is split on c (column-like or batched)
        self.sequence_parallel = bool(sequence_parallel)
        if self.sequence_parallel:
            check_split(self, einsum_str, _parse(owner, einsum_str, kernel_shape), shard_dim)
        model = self._spec_axis(axis_name)
        self.kernel_spec = storage_spec(nd, [(shard_dim, model)])
        self.bias_spec = P()
        if bias_shape is not None:
            bias_shape = tuple(int(d) for d in bias_shape)
            want = tuple(kernel_shape[ks.index(k)] for k in out if k in ks)
            if self.column and n > 1:  # (unsplit, any shape nnx.Einsum reshapes will do)
                if bias_shape != want:
                    raise ValueError(
                        f"{owner}(bias_shape={bias_shape}): kernel dim {shard_dim} is split and "
                        f"is an output dim of {einsum_str!r}, so the bias is split too: "
                        f"bias_shape must list the output's kernel dims in output order, "
                        f"{want}. Pass bias_shape={want}."
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
        self.split_letter = c  # in the constructor's equation (ellipses spelled out)

    # ------------------------------------------------------------------ layout

    def _subscripts(self, einsum_str: str | None, ndim: int | None) -> tuple[str, str, str]:
        """(input, kernel, output) letters of `einsum_str` on an input of rank `ndim`.

        Ellipses are spelled out as flax does; `ndim=None` reads an input
        ellipsis as empty.
        """
        eq = (einsum_str or self.einsum_str).replace(" ", "")
        if ndim is None:
            ndim = len(eq.split(",")[0].replace("...", ""))
        return kernels.einsum_subscripts(eq, (1,) * ndim, self.kernel_shape)

    def _seq_letter(self, xs: str, ks: str, out: str) -> str | None:
        """Under sequence parallelism: the input's dim-1 letter (the sequence), else None."""
        return xs[1] if self.sequence_parallel and len(xs) > 1 else None

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

    def input_spec(self, einsum_str: str | None = None, ndim: int | None = None) -> P:
        """The input's spec: the batch over the batch axes, the split letter (if any) over model."""
        xs, ks, out = self._subscripts(einsum_str, ndim)
        c, s = ks[self.shard_dim], self._seq_letter(xs, ks, out)
        split = s if s is not None and c in out and c not in xs else c  # column-like SP
        return self._spec(xs, self._batch_letter(xs, ks, out), split)

    def output_spec(self, einsum_str: str | None = None, ndim: int | None = None) -> P:
        """The output's spec; `ndim` is the input's rank (for an ellipsis)."""
        xs, ks, out = self._subscripts(einsum_str, ndim)
        c, s = ks[self.shard_dim], self._seq_letter(xs, ks, out)
        split = s if s is not None and c not in out else c  # row-like SP: the sequence
        return self._spec(out, self._batch_letter(xs, ks, out), split)

    def _infer_broadcasted_bias_shape(self, einsum_str: str, lhs: Any, rhs: Any) -> list[int]:
        """The shape the bias is reshaped to before it is added (as `nnx.Einsum`'s)."""
        _, ks, out = kernels.einsum_subscripts(einsum_str, lhs.shape, rhs.shape)
        return [self.kernel_shape[ks.index(k)] if k in ks else 1 for k in out]

    def _check(self, inputs: jax.Array, einsum_str: str) -> tuple[str, str, str]:
        owner = type(self).__name__
        if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
            raise TypeError(f"{owner}: inputs must be an array, got {type(inputs).__name__}.")
        _parse(owner, einsum_str, self.kernel_shape)
        raw = einsum_str.split(",")[0]
        named = len(raw.replace("...", ""))
        if inputs.ndim < named if "..." in raw else inputs.ndim != named:
            raise ValueError(
                f"{owner}({einsum_str!r}): inputs.shape={tuple(inputs.shape)} has rank "
                f"{inputs.ndim}, the equation's input {raw!r} has rank "
                f"{'at least ' if '...' in raw else ''}{named}."
            )
        xs, ks, out = self._subscripts(einsum_str, inputs.ndim)
        c = ks[self.shard_dim]
        if self.bias is not None and (c in out) != self.column:
            raise ValueError(
                f"{owner}(einsum_str={einsum_str!r}): kernel dim {self.shard_dim} (split over "
                f"{self.axis_name!r}) is {'an' if c in out else 'not an'} output dim here but "
                f"{'is' if self.column else 'is not'} in {self.einsum_str!r}, for which the "
                f"bias was laid out. Keep the split dim's role, or build the layer with this "
                f"equation."
            )
        manual = is_manual(self.mesh)
        n = self.model_size
        b = self._batch_letter(xs, ks, out)
        for i, k in enumerate(xs):
            if k not in ks:
                continue
            want = self.kernel_shape[ks.index(k)]
            local = want // n if (manual and k == c) else want
            if inputs.shape[i] != local and not (inputs.shape[i] == 1 and k != c):
                raise ValueError(
                    f"{owner}({einsum_str!r}, kernel_shape={self.kernel_shape}): inputs.shape"
                    f"[{i}]={inputs.shape[i]} (letter {k!r}) must equal the kernel's {local}"
                    f"{' (its local shard: manual mode)' if local != want else ''}"
                    f"{'; the split dim cannot broadcast' if k == c else ''}."
                )
        if self.sequence_parallel:
            check_sequence(self, inputs, einsum_str, (xs, ks, out), manual)
        if b is not None and not manual and inputs.shape[0] % self.batch_size_divisor:
            m = self.batch_size_divisor
            raise ValueError(
                f"{owner}: inputs.shape[0]={inputs.shape[0]} (the batch) cannot be sharded over "
                f"mesh axes {self.batch_axes} (size {m}): {m} does not divide "
                f"{inputs.shape[0]}. Use a batch size divisible by {m}."
            )
        return xs, ks, out

    # -------------------------------------------------------------------- call

    def __call__(
        self, inputs: jax.Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> jax.Array:
        with jax.named_scope(type(self).__name__):
            einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
            xs, ks, out = self._check(inputs, einsum_str)
            x_spec = self.input_spec(einsum_str, inputs.ndim)
            source, inputs = inputs, self._place(inputs, x_spec)
            arg, arg_spec, unwrap = inputs, x_spec, _identity
            c, s = ks[self.shard_dim], self._seq_letter(xs, ks, out)
            if c in out and c not in xs and s is None:  # column-like: one dx all-reduce per
                arg, arg_spec, unwrap = shared_model_input(self, source, inputs, x_spec)  # input
            seq_axis = None if s is None else (xs.index(s) if c in out else out.index(s))
            # row-like SP: the bias meets tokens split over the model axis too
            bias_axes = (self.axis_name,) if s is not None and c not in out else ()

            def body(x, kernel, bias):
                (kernel,) = self._replicated_for_grad(kernel)
                if bias is not None:  # its gradient: one sum over the batch (and token) axes
                    axes = live_axes(self.mesh, (*self.batch_axes, *bias_axes))
                    bias = kernels.ensure_varying(bias, axes)
                x, kernel, bias = self.promote_dtype((unwrap(x), kernel, bias), dtype=self.dtype)
                return kernels.parallel_einsum(
                    einsum_str, x, kernel, bias, split=self.shard_dim,
                    axis_name=self.axis_name, precision=self.precision,
                    einsum_op=self.einsum_op,
                    preferred_element_type=self.preferred_element_type,
                    sequence_axis=seq_axis,
                )  # fmt: skip

            y = self._shard_map(
                body,
                (arg, self.kernel[...], param_value(self.bias)),
                (arg_spec, self.kernel_spec, self.bias_spec),
                self.output_spec(einsum_str, inputs.ndim),
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
        shared input: declare it for one reader of an activation). Batched:
        none. Row-like: forward 1 all-reduce of the output (and, when the split
        letter is not an input letter, backward 1 all-reduce of dx). With
        `grad`, 1 all-reduce per parameter over the batch axes.
        """
        einsum_str = (einsum_str or self.einsum_str).replace(" ", "")
        dtype = dtype or self.dtype or self.param_dtype
        input_shape = tuple(input_shape)
        xs, ks, out = self._subscripts(einsum_str, len(input_shape))
        c = ks[self.shard_dim]
        n = self.model_size
        sizes = dict(zip(xs, input_shape, strict=True))
        sizes.update(zip(ks, self.kernel_shape, strict=True))
        b = self._batch_letter(xs, ks, out)
        if b is not None:
            sizes[b] //= self.batch_size_divisor
        m = (self.axis_name,)
        res = []
        x_local = [sizes[k] // (n if k == c else 1) for k in xs]
        s = self._seq_letter(xs, ks, out)
        if c not in out:
            y = [sizes[k] for k in out]
            if s is None:
                res += self._declare("all-reduce", m, dtype, nbytes(y, dtype), "sum of partials")
            else:  # the sum and the sequence split in one op; dy gathered back
                res += self._declare("reduce-scatter", m, dtype, nbytes(y, dtype),
                                     "SP: sum of partials")  # fmt: skip
                if grad:
                    res += self._declare("all-gather", m, dtype, nbytes(y, dtype), "SP: dy")
        elif s is not None:  # column-like SP: x gathered over the sequence, dx scattered
            res += self._declare("all-gather", m, dtype, nbytes(x_local, dtype), "SP: gather x")
            if grad and input_grad:
                res += self._declare("reduce-scatter", m, dtype, nbytes(x_local, dtype),
                                     "SP: dx")  # fmt: skip
        if c not in xs and grad and input_grad and s is None:
            res += self._declare("all-reduce", m, dtype, nbytes(x_local, dtype), "dx")
        if grad:
            pd = self.param_dtype
            k_local = list(self.kernel_shape)
            k_local[self.shard_dim] //= n
            res += self._declare("all-reduce", self.batch_axes, pd, nbytes(k_local, pd), "dW",
                                 role=Role.GRAD_REDUCE, param="kernel")  # fmt: skip
            if self.bias_shape is not None:
                bl = list(self.bias_shape)
                if c in out:
                    bl[[k for k in out if k in ks].index(c)] //= n
                axes = (*self.batch_axes, *(m if s is not None and c not in out else ()))
                res += self._declare("all-reduce", axes, pd, nbytes(bl, pd), "db",
                                     role=Role.GRAD_REDUCE, param="bias")  # fmt: skip
        return res


def _parse(owner: str, einsum_str: str, kernel_shape: Sequence[int]) -> tuple[str, str, str]:
    """The (input, kernel, output) subscripts, with the checks nnx.Einsum makes (ValueError).

    An input ellipsis is read as empty (the input's rank is not known here).
    """
    if "->" not in einsum_str:
        raise ValueError(
            f'{owner}: `einsum_str` equation must be explicit and include "->", got {einsum_str!r}.'
        )
    if einsum_str.count(",") != 1:
        raise ValueError(
            f"{owner}: `einsum_str` equation must have exactly two operands and therefore, "
            f"exactly one comma character, instead of {einsum_str.count(',')} ({einsum_str!r})."
        )
    raw_k = einsum_str.split("->")[0].split(",")[1]
    named = len(raw_k.replace("...", ""))
    if (len(kernel_shape) < named) if "..." in raw_k else (len(kernel_shape) != named):
        raise ValueError(
            f"{owner}({einsum_str!r}, kernel_shape={tuple(kernel_shape)}): the kernel "
            f"subscripts {raw_k!r} name {named} dims, the kernel has {len(kernel_shape)}."
        )
    x_named = len(einsum_str.split(",")[0].replace("...", ""))
    return kernels.einsum_subscripts(einsum_str, (1,) * x_named, tuple(kernel_shape))
