"""Shared test helpers: the tolerance table, mesh lists, references, skips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardlax

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
