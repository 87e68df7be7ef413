"""`fully_shard` keeps the module and its nnx paths (FSDP2's in-place class change).

A unit is the module itself, re-classed: optax labels that read paths label a
wrapped model as the plain one (so it trains as the plain model on one device),
checkpoints move between wrapped and unwrapped models, and what the unit's
class adds is refused where it would clash.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shardlax
from shardlax import checkpoint
from shardlax.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from tests import utils
from tests.models import CORPUS, batches, logical, one_device_reference
from tests.test_trainer_fsdp_units import compare, wrap

pytestmark = pytest.mark.standard_dtype_promotion


def by_first_name(params):
    """optax labels from the first path component: the blocks get one optimizer."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "blocks" if path[0].key == "layers" else "rest", params
    )


def partitioned():
    return optax.partition(
        {"blocks": utils.adamw_clipped(1e-3), "rest": optax.sgd(1e-1)}, by_first_name
    )


@pytest.mark.parametrize("how", ["per_block", "nested"])
def test_path_labels_train_a_wrapped_model_as_the_plain_one(how):
    ctor, make_batch, loss_fn = CORPUS["decoder"]
    data = batches(make_batch, 8, 3)
    ref = one_device_reference(ctor, loss_fn, partitioned(), data)
    mesh = utils.mesh(1, 2, 1)
    model = wrap(ctor(), how, mesh)
    assert set(logical(nnx.state(model, nnx.Param))) == set(logical(ref.params))
    trainer = shardlax.Trainer(model, partitioned(), loss_fn, mesh=mesh, strategy="fsdp")
    state, losses = trainer.init(), []
    for batch in data:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    utils.assert_close(np.array(losses), np.array(ref.losses), err_msg="losses")
    compare(nnx.state(trainer.model(state), nnx.Param), ref.params, "params")


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))

    def _hidden(self, x):
        return self.up(x)


def test_a_checkpoint_moves_between_wrapped_and_unwrapped_models(tmp_path):
    mesh = utils.mesh(1, 4, 1)
    x = jax.random.normal(jax.random.key(1), (8, 8))
    wrapped = fully_shard(MLP(nnx.Rngs(0)), mesh=mesh)
    checkpoint.save_model(tmp_path / "wrapped", wrapped)
    plain = checkpoint.restore_model(tmp_path / "wrapped", MLP(nnx.Rngs(7)))
    want = MLP(nnx.Rngs(0))
    utils.assert_close(plain(x), want(x))
    checkpoint.save_model(tmp_path / "plain", want)
    again = checkpoint.restore_model(tmp_path / "plain", fully_shard(MLP(nnx.Rngs(7)), mesh=mesh))
    utils.assert_sharding(again.up.kernel[...], mesh, jax.P("fsdp", None))
    utils.assert_close(nnx.jit(lambda m, x: m(x))(again, x), want(x))


def test_registered_methods_are_per_unit():
    mesh = utils.mesh(1, 2, 1)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    a, b = fully_shard(MLP(nnx.Rngs(0)), mesh=mesh), fully_shard(MLP(nnx.Rngs(0)), mesh=mesh)
    register_fsdp_forward_method(a, "_hidden")
    assert isinstance(a, MLP) and isinstance(a, FSDPModule) and a.fsdp_config.base is MLP
    utils.assert_close(nnx.jit(lambda m, x: m._hidden(x))(a, x), MLP(nnx.Rngs(0))._hidden(x))
    with pytest.raises(AttributeError, match=r"FSDPModule\(MLP\)\._hidden: a private method"):
        b._hidden(x)  # registering on `a` changed only `a`'s class
    # equal units have equal graphdefs: one trace for both
    assert nnx.graphdef(b) == nnx.graphdef(fully_shard(MLP(nnx.Rngs(3)), mesh=mesh))


def test_wrapping_a_unit_again_is_refused():
    mesh = utils.mesh(1, 2, 1)
    unit = fully_shard(MLP(nnx.Rngs(0)), mesh=mesh)
    with pytest.raises(ValueError, match=r"fully_shard\(module=FSDPMLP\): the module is already"):
        fully_shard(unit, mesh=mesh)


def test_a_module_defining_the_units_names_is_refused():
    class Probe(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

        def param_paths(self):
            return ("mine",)

    with pytest.raises(
        ValueError, match=r"fully_shard\(Probe\): Probe defines \['param_paths'\], which the unit"
    ):
        fully_shard(Probe(nnx.Rngs(0)), mesh=utils.mesh(1, 2, 1))
    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    lin.fsdp_config = "mine"
    with pytest.raises(ValueError, match=r"Linear defines \['fsdp_config'\]"):
        fully_shard(lin, mesh=utils.mesh(1, 2, 1))


def test_configuration_methods_are_not_run_through_the_unit():
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    unit = fully_shard(Drop(nnx.Rngs(0)), mesh=utils.mesh(1, 2, 1))
    view = nnx.view(unit, deterministic=True)
    x = jnp.ones((4, 8))
    utils.assert_close(nnx.jit(lambda m, x: m(x))(view, x), Drop(nnx.Rngs(0)).lin(x))
    unit.eval()  # nnx.Module's own methods run as they are
    assert unit.drop.deterministic
