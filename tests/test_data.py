"""The synthetic language: deterministic, and its entropy floor is right."""

from __future__ import annotations

import numpy as np
import pytest

from shardlax.data import NGramLanguage


@pytest.mark.parametrize("order", [2, 3])
def test_true_model_loss_matches_the_floor(order):
    lang = NGramLanguage(vocab=16, order=order, branching=3, seed=1)
    tokens = lang.sample(4000, 24, seed=0)
    nll = lang.log_likelihood(tokens)
    full = nll[:, order - 2 :]  # targets with a complete context
    # Monte-Carlo mean of -log p under the true model vs the analytic entropy rate
    stderr = full.std() / np.sqrt(full.size)
    assert abs(full.mean() - lang.entropy_rate) < 5 * stderr + 1e-3
    assert 0 < lang.entropy_rate < np.log(3) + 1e-9  # at most 3 tokens can follow a context


def test_empirical_bigram_matches_the_table():
    lang = NGramLanguage(vocab=8, order=2, branching=2, seed=3)
    tokens = lang.sample(2000, 50, seed=7)
    counts = np.zeros((8, 8))
    np.add.at(counts, (tokens[:, :-1].ravel(), tokens[:, 1:].ravel()), 1)
    seen = counts.sum(axis=1) > 2000  # contexts the chain visits often (some are transient)
    assert seen.sum() >= 2
    freq = counts[seen] / counts[seen].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(freq, lang.table[seen], atol=0.03)
    # the first token follows the stationary distribution
    first = np.bincount(tokens[:, 0], minlength=8) / 2000
    np.testing.assert_allclose(first, lang.stationary, atol=0.04)


def test_first_position_costs_the_marginal_entropy():
    lang = NGramLanguage(vocab=8, order=3, branching=2, seed=0)
    h = lang.position_entropies(5)
    pair = lang.stationary.reshape(8, 8)
    h0 = -np.sum(pair.sum(1) * np.log(np.maximum(pair.sum(1), 1e-300)))
    h01 = -np.sum(pair * np.log(np.where(pair > 0, pair, 1)))
    assert h[0] == pytest.approx(h01 - h0)
    assert np.all(h[1:] == lang.entropy_rate)
    assert lang.loss_floor(5) == pytest.approx(np.mean(h))


def test_deterministic_and_shifted_targets():
    lang = NGramLanguage(vocab=32, seed=0)
    a_in, a_tg = lang.batch(4, 10, step=3)
    b_in, _ = NGramLanguage(vocab=32, seed=0).batch(4, 10, step=3)
    np.testing.assert_array_equal(a_in, b_in)
    np.testing.assert_array_equal(a_in[:, 1:], a_tg[:, :-1])
    assert a_in.dtype == np.int32 and a_in.shape == (4, 10)
    c_in, _ = lang.batch(4, 10, step=4)
    assert not np.array_equal(a_in, c_in)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"NGramLanguage\(order=1\): order must be at least 2"):
        NGramLanguage(order=1)
    with pytest.raises(ValueError, match=r"NGramLanguage\(branching=0\)"):
        NGramLanguage(branching=0)
    with pytest.raises(ValueError, match=r"would have .* entries"):
        NGramLanguage(vocab=4096, order=3)
