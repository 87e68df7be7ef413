"""shardlax.declarations: structured records of what layers promise to communicate."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from shardlax import audit, declarations
from shardlax.declarations import Declared, Phase, Role


def test_declared_records_are_structured():
    d = Declared("all-gather", ("fsdp",), "f32", 1, 64, "gather W", role=Role.PARAM_GATHER,
                 phase=Phase.FORWARD, module="mlp", param="down.kernel")  # fmt: skip
    assert d.key == (Role.PARAM_GATHER, Phase.FORWARD, "mlp", "down.kernel", "")
    other = declarations.Declared(
        "all-reduce", ("model",), "f32", 1, 64, "gather W", role=declarations.Role.ACTIVATION
    )
    # the same display text, different purposes: filters see the fields, not `why`
    assert declarations.select([d, other], role=declarations.Role.PARAM_GATHER) == [d]
    assert declarations.drop([d, other], {"module": "mlp", "param": "down.kernel"}) == [other]
    with pytest.raises(TypeError, match=r"Declared\(role='param-gather'\): expected a shardlax"):
        declarations.Declared("all-gather", ("fsdp",), "f32", role="param-gather")
    with pytest.raises(TypeError, match=r"Declared.matches\(who=...\): not a field"):
        d.matches(who="mlp")
    with pytest.raises(ValueError, match=r"Declared\(kind='all-sum'\): expected one of"):
        declarations.Declared("all-sum", ("fsdp",), "f32")


def test_audit_re_exports_the_declarations():
    for name in ("Declared", "Role", "Phase", "KINDS", "hlo_dtype", "nbytes", "select", "drop"):
        assert getattr(audit, name) is getattr(declarations, name)


@pytest.mark.parametrize(
    "kind, size, n, want",
    [("all-reduce", 800, 4, 2 * 800 * 3 / 4), ("all-gather", 800, 4, 600.0),
     ("reduce-scatter", 800, 8, 700.0), ("all-to-all", 800, 2, 400.0),
     ("collective-permute", 800, 2, 800.0), ("all-reduce", 800, 1, 0.0)],
)  # fmt: skip
def test_wire_bytes_are_the_ring_formulas(kind, size, n, want):
    assert declarations.wire_bytes(kind, size, n) == want


def test_nbytes_and_bad_kind():
    assert declarations.nbytes((3, 5), jnp.bfloat16) == 30
    with pytest.raises(ValueError, match=r"wire_bytes\(kind='psum'\): expected one of"):
        declarations.wire_bytes("psum", 8, 2)
