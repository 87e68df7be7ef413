"""Test setup: 8 simulated CPU devices, hypothesis profiles, shared fixtures.

The library never sets device counts; the tests ask for them here, before JAX
initialises its backends.
"""

from __future__ import annotations

import os

import jax

# Must run before any backend is created (importing jax does not create one).
jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402
import pytest  # noqa: E402

#: The default profile: few examples, deterministic (derandomize) for CI. Tests whose every
#: example compiles sharded programs take `tests.utils.examples(n)` (n examples here, scaled
#: up under "thorough"); no test file writes its own `settings(...)`.
hypothesis.settings.register_profile(
    "ci",
    max_examples=6,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "thorough",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("SHARDLAX_HYPOTHESIS_PROFILE", "ci"))


#: Test files whose every test is heavy (marked `slow`: `pytest -m slow` runs them, CI runs
#: them after the default suite). Each is end-to-end: whole models trained on several meshes
#: against one device, abstract compiles of cluster-sized programs, subprocesses.
SLOW_FILES = {
    # layer-level files whose meshes x shapes matrices cost > 30 s each on 2 cores
    "test_attention.py",
    "test_embed.py",
    "test_mlp.py",
    "test_sequence_parallel.py",
    "test_kernels_reference_layers.py",
    "test_parity_embed.py",
    "test_parity_norm.py",
    "test_loading.py",
    "test_fsdp_scan_state.py",
    "test_default_mesh.py",
    "test_budget.py",
    "test_parallelize_trainer.py",
    "test_linear_sp.py",
    "test_cross_entropy.py",
    "test_dropout.py",
    "test_fsdp_wrapper.py",
    "test_fsdp_units.py",
    "test_fsdp_memory.py",
    "test_train_mixed.py",
    "test_attention_dropout.py",
    "test_einsum_sp.py",
    # heavy end-to-end files
    "test_benchmarks.py",
    "test_checkpoint.py",
    "test_checkpoint_bench.py",
    "test_checkpoint_process.py",
    "test_linear.py",
    "test_models_corpus.py",
    "test_parallelize.py",
    "test_parallelize_trainer_slow.py",
    "test_plan.py",
    "test_readme.py",
    "test_tinylm.py",
    "test_train_deep.py",
    "test_trainer_corpus.py",
    "test_trainer_fsdp_units.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return (
        f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"hypothesis profile {os.environ.get('SHARDLAX_HYPOTHESIS_PROFILE', 'ci')}"
    )


@pytest.fixture(autouse=True)
def _strict_jax(request):
    """Strict dtype promotion and rank promotion inside every test (as Equinox does).

    Tests that run optax, whose updates mix Python scalars and int32 step
    counts, mark themselves `@pytest.mark.standard_dtype_promotion`: rank
    promotion still raises there.
    """
    dtype_mode = (
        "standard" if request.node.get_closest_marker("standard_dtype_promotion") else "strict"
    )
    with jax.numpy_dtype_promotion(dtype_mode), jax.numpy_rank_promotion("raise"):
        yield
