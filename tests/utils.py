"""Shared test helpers: the tolerance table, mesh lists, references, skips.

Also the hypothesis example counts (`examples`), placement of global arrays
(`place`), the optax chain most training tests use (`adamw_clipped`), non-zero
biases (`randomize_biases`), and, for the kernel tests, a naive loop over mesh
indices with every collective written as numpy over the loop (`NaiveMesh`, in the
manner of JAX's `shmap_reference`).
"""

from __future__ import annotations

import itertools

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import shardlax

_P = jax.sharding.PartitionSpec

#: One tolerance per dtype, for every comparison with single-device math.
#: Never loosened per test. f32: sharded sums reorder additions (a few ulps of
#: the largest term). bf16: 8 bits of mantissa, one rounding per op.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=4e-2, atol=4e-2),
}

#: (data, model) meshes of the foundation issue.
DATA_MODEL_MESHES = [(1, 1), (1, 2), (1, 8), (2, 4), (4, 2), (8, 1)]
#: (data, fsdp, model) meshes used by later layers.
MESHES_3D = [(1, 1, 1), (2, 2, 2), (1, 1, 8), (8, 1, 1), (1, 8, 1), (2, 1, 4)]
#: (data, fsdp, model) meshes of the layer-vs-reference tests (embed, MLP, cross-entropy):
#: one device, model only, and every axis at 2.
LAYER_MESHES = [(1, 1, 1), (1, 1, 8), (2, 2, 2)]
#: Small meshes for per-kernel tests against the naive mesh loop: (rows, cols) of axes ("a", "b").
KERNEL_MESHES = [(2, 2), (1, 4)]


def examples(n: int) -> hypothesis.settings:
    """Settings for a hypothesis test whose every example compiles sharded programs.

    `n` examples under the default `ci` profile (registered in conftest), scaled by
    the loaded profile's count otherwise (`thorough`: `n * 100 / 6`). All other
    settings (deadline, derandomize, health checks) come from the loaded profile.
    """
    ci = hypothesis.settings.get_profile("ci").max_examples
    return hypothesis.settings(max_examples=max(1, n * hypothesis.settings().max_examples // ci))


def tolerance(dtype) -> dict:
    return TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype=jnp.float32, err_msg: str = "") -> None:
    """Compare in f32 with the dtype's tolerance, scaled by the reference's magnitude."""
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    tol = tolerance(dtype)
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=err_msg)


def need_devices(n: int) -> None:
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, have {jax.device_count()}")


def mesh(data: int = 1, fsdp: int = 1, model: int = 1, axis_types: str = "explicit"):
    need_devices(data * fsdp * model)
    return shardlax.make_mesh(data=data, fsdp=fsdp, model=model, axis_types=axis_types)


def to_numpy(tree):
    """Every leaf as a numpy array (global values)."""
    return jax.tree.map(lambda x: np.asarray(x), tree)


def assert_sharding(x, mesh, spec) -> None:
    """`x` is laid out as `spec` on `mesh` (equivalence, so size-1 axes may be dropped)."""
    want = jax.sharding.NamedSharding(mesh, spec)
    assert x.sharding.is_equivalent_to(want, x.ndim), f"{x.sharding} is not {want}"


class count_compiles:
    """Context: counts XLA compilations of jitted functions named `name` (jax.log_compiles).

    `jit(f)._cache_size()` also counts C++ dispatch entries that share one
    compiled program, so tests count compilations instead.
    """

    def __init__(self, name: str):
        self.name = name
        self.count = 0

    def __enter__(self):
        import logging

        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Finished XLA compilation of") and f"jit({outer.name})" in msg:
                    outer.count += 1

        self._handler = _Handler()
        self._logger = logging.getLogger("jax._src.dispatch")
        self._logger.addHandler(self._handler)
        self._ctx = jax.log_compiles(True)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._logger.removeHandler(self._handler)


def place(x, mesh, spec):
    """`x` as a global array laid out as `spec` on `mesh`."""
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))


def adamw_clipped(max_norm: float, lr: float = 1e-2, weight_decay: float = 0.1, **adamw_kw):
    """`clip_by_global_norm(max_norm)` then `adamw`: the chain the training tests compare."""
    return optax.chain(
        optax.clip_by_global_norm(max_norm), optax.adamw(lr, weight_decay=weight_decay, **adamw_kw)
    )


def randomize_biases(linears, seed: int):
    """Non-zero f32 biases (normal draws from keys `seed, seed + 1, ...`, each bias keeping its
    sharding) on the layers that have one; returns `linears`.

    A bias counted N times, or a gradient of it off by N, shows only when the bias is not 0.
    """
    for i, lin in enumerate(x for x in linears if x is not None and x.use_bias):
        b = jax.random.normal(jax.random.key(seed + i), lin.bias[...].shape)
        lin.bias[...] = jax.device_put(b, lin.bias[...].sharding)
    return linears


def with_random_bias(layer, seed: int):
    """`layer` with a non-zero bias (`randomize_biases([layer], seed)`), for inline use."""
    randomize_biases([layer], seed)
    return layer


def reference_linear(x, kernel, bias, dtype):
    """Plain jnp on the full arrays: `x @ W + b` in the compute dtype (as nnx.Linear)."""
    x, kernel = jnp.asarray(x).astype(dtype), jnp.asarray(kernel).astype(dtype)
    y = jnp.matmul(x, kernel)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias).astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


class NaiveMesh:
    """A mesh simulated by a Python loop: per-device numpy values and numpy collectives.

    The reference for the kernels (as JAX's `shmap_reference`): a per-device value is a
    dict `{mesh index: np.ndarray}` over `np.ndindex(shape)`; `shard` slices a global
    array for every index as a `PartitionSpec` says, and the collectives are explicit
    numpy sums and concatenations over the devices that share every other mesh
    coordinate, taken in row-major order of the named axes. Nothing here calls jax.
    """

    def __init__(self, shape: tuple[int, ...], names: tuple[str, ...]):
        self.shape, self.names = tuple(shape), tuple(names)
        self.indices = list(np.ndindex(*self.shape))

    def size(self, axes) -> int:
        return int(np.prod([self.shape[self.names.index(a)] for a in _axes(axes)]))

    def position(self, idx, axes) -> int:
        """Row-major position of device `idx` over `axes` (as `lax.axis_index`)."""
        pos = 0
        for a in _axes(axes):
            k = self.names.index(a)
            pos = pos * self.shape[k] + idx[k]
        return pos

    def group(self, idx, axes) -> list[tuple[int, ...]]:
        """The devices that differ from `idx` only over `axes`, in row-major order over them."""
        dims = [self.names.index(a) for a in _axes(axes)]
        out = []
        for coords in itertools.product(*(range(self.shape[k]) for k in dims)):
            j = list(idx)
            for k, c in zip(dims, coords, strict=True):
                j[k] = c
            out.append(tuple(j))
        return out

    def shard(self, x, spec) -> dict:
        """Every device's block of the global `x` laid out as `spec` (a PartitionSpec)."""
        x = np.asarray(x)
        out = {}
        for idx in self.indices:
            sl = []
            for d, entry in enumerate(tuple(spec) + (None,) * (x.ndim - len(spec))):
                if entry is None:
                    sl.append(slice(None))
                    continue
                n, i = self.size(entry), self.position(idx, entry)
                w = x.shape[d] // n
                sl.append(slice(i * w, (i + 1) * w))
            out[idx] = x[tuple(sl)]
        return out

    def replicate(self, x) -> dict:
        return {idx: np.asarray(x) for idx in self.indices}

    def map(self, fn, *values) -> dict:
        """`fn` on every device's blocks (local math, no communication)."""
        return {idx: fn(*(v[idx] for v in values)) for idx in self.indices}

    def psum(self, v: dict, axes) -> dict:
        return {i: sum(v[j] for j in self.group(i, axes)) for i in self.indices}

    def pmax(self, v: dict, axes) -> dict:
        return {i: np.max([v[j] for j in self.group(i, axes)], axis=0) for i in self.indices}

    def all_gather(self, v: dict, axes, axis: int) -> dict:
        """Tiled all-gather: the group's blocks concatenated along `axis`."""
        return {
            i: np.concatenate([v[j] for j in self.group(i, axes)], axis=axis) for i in self.indices
        }

    def psum_scatter(self, v: dict, axes, axis: int) -> dict:
        """Tiled reduce-scatter: the group's sum, split along `axis`, this device's piece."""
        total = self.psum(v, axes)
        return {
            i: np.split(total[i], self.size(axes), axis=axis)[self.position(i, axes)]
            for i in self.indices
        }

    def ppermute(self, v: dict, axis: str, perm) -> dict:
        """Device at position `src` over `axis` sends to position `dst`; no sender: zeros."""
        out = {}
        for i in self.indices:
            group, me = self.group(i, axis), self.position(i, axis)
            src = [s for s, d in perm if d == me]
            out[i] = v[group[src[0]]] if src else np.zeros_like(v[i])
        return out

    def all_to_all(self, v: dict, axis: str, split_axis: int, concat_axis: int) -> dict:
        """Piece k of device j's `split_axis` goes to device k, concatenated in order of j."""
        out = {}
        for i in self.indices:
            group, me = self.group(i, axis), self.position(i, axis)
            pieces = [np.split(v[j], len(group), axis=split_axis)[me] for j in group]
            out[i] = np.concatenate(pieces, axis=concat_axis)
        return out

    def unshard(self, v: dict, spec, *, check_replicas: bool = True) -> np.ndarray:
        """The global array from per-device blocks laid out as `spec`.

        Blocks of devices that hold the same part (the axes `spec` does not name) must
        be equal: a value that should be replicated and is not fails here.
        """
        names_in_spec = {a for e in spec if e is not None for a in _axes(e)}
        rest = [a for a in self.names if a not in names_in_spec]
        first = self.indices[0]
        nd = v[first].ndim
        full = tuple(spec) + (None,) * (nd - len(spec))
        blocks = {}
        for idx in self.indices:
            key = tuple(None if e is None else self.position(idx, e) for e in full)
            if key in blocks:
                if check_replicas:
                    np.testing.assert_array_equal(
                        v[idx], blocks[key], err_msg=f"devices differ over replicated {rest}"
                    )
                continue
            blocks[key] = v[idx]
        shape = [v[first].shape[d] * (1 if e is None else self.size(e)) for d, e in enumerate(full)]
        out = np.zeros(shape, v[first].dtype)
        for key, b in blocks.items():
            sl = tuple(
                slice(None) if k is None else slice(k * b.shape[d], (k + 1) * b.shape[d])
                for d, k in enumerate(key)
            )
            out[sl] = b
        return out


def _axes(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def per_device(fn, mesh, in_specs, *args) -> dict:
    """Run `fn` under `jax.shard_map` (jit) and return every device's output block.

    Each output leaf is stacked over the mesh (out_specs name every axis on new
    leading dims), so the result is `{mesh index: np.ndarray}` per leaf: what each
    device computed, replicated values included (one device's wrong copy shows).
    """
    names = mesh.axis_names
    lead = (1,) * len(names)

    def body(*a):
        return jax.tree.map(lambda y: jnp.reshape(y, lead + y.shape), fn(*a))

    args = [place(x, mesh, s) for x, s in zip(args, in_specs, strict=True)]
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=_P(*names)))(
        *args
    )

    def split(y):
        y = np.asarray(y)
        return {idx: y[idx] for idx in np.ndindex(*mesh.devices.shape)}

    return jax.tree.map(split, out)


def kernel_mesh(shape: tuple[int, int], names: tuple[str, str] = ("a", "b")):
    """A raw (Auto) `jax.sharding.Mesh` of `shape` for kernel tests (skips if too few devices)."""
    n = int(np.prod(shape))
    need_devices(n)
    return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def assert_per_device(got: dict, want: dict, dtype=jnp.float32, exact: bool = False) -> None:
    """Every device's block of a kernel (`per_device`) equals the naive loop's (`NaiveMesh`)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for idx in want:
        if exact:
            np.testing.assert_array_equal(got[idx], want[idx], err_msg=f"device {idx}")
        else:
            assert_close(got[idx], want[idx], dtype, f"device {idx}")


def assert_vjp_close(sharded, reference, args, cotangent, dtype=jnp.float32) -> None:
    """`jax.vjp` of a sharded function equals that of a full-array reference (ratio 1).

    `sharded` and `reference` take the same global arguments; the cotangent is
    global too. Forward values and every argument's gradient are compared.
    """

    def value_and_vjp(f):
        def run(args, cot):
            y, vjp = jax.vjp(f, *args)
            return y, vjp(cot)

        return jax.jit(run)(tuple(args), cotangent)  # one compile, not op-by-op dispatch

    (y, grads), (ry, rgrads) = value_and_vjp(sharded), value_and_vjp(reference)
    jax.tree.map(lambda a, e: assert_close(a, e, dtype, "forward"), y, ry)
    for k, (g, r) in enumerate(zip(grads, rgrads, strict=True)):
        assert_close(g, r, dtype, f"d argument {k}")


def kernel_and_naive_mesh(shape):
    """The jax mesh of `kernel_mesh(shape)` and its `NaiveMesh` twin (axes 'a', 'b')."""
    return kernel_mesh(shape), NaiveMesh(shape, ("a", "b"))


def rand(seed, *shape, dtype=np.float32):
    """A standard-normal numpy array of `shape` from `seed`."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def sharded_kernel(kernel, mesh, in_specs, out_specs):
    """`kernel` under jit(shard_map) on `mesh`: the program a kernel test compares."""
    return jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
