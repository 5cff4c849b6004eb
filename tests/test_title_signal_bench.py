"""bench/title_signal_bench.py: its weighted ridge, weighted correlation and cross-validated ridge strength against
reference computations (numpy's least squares, np.corrcoef), so the page's 'what a title says about a never-seen
item' figures rest on checked arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from bench.title_signal_bench import LAMBDAS, choose_lambda, predict, ridge, stacked, weighted_corr


def test_ridge_without_penalty_is_weighted_least_squares():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(50, 3)), rng.uniform(0.5, 3.0, 50)
    y = x @ [1.0, -2.0, 0.5] + 0.3 + rng.normal(scale=0.1, size=50)
    a = np.c_[x, np.ones(50)] * np.sqrt(w)[:, None]
    want = np.linalg.lstsq(a, y * np.sqrt(w), rcond=None)[0]
    assert np.allclose(ridge(x, y, w, 0.0), want)
    assert np.allclose(predict(want, x), np.c_[x, np.ones(50)] @ want)
    shrunk = ridge(x, y, w, 1e6)  # the intercept is not penalised: a huge penalty leaves the weighted mean
    assert np.allclose(shrunk[:3], 0.0, atol=1e-3) and shrunk[3] == pytest.approx(np.average(y, weights=w), abs=1e-2)


def test_weighted_correlation_with_equal_weights_is_pearsons():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(size=40)
    assert weighted_corr(a, b, np.ones(40)) == pytest.approx(np.corrcoef(a, b)[0, 1])
    repeated = weighted_corr(np.r_[a, a[:5]], np.r_[b, b[:5]], np.ones(45))  # a weight of 2 = a row twice
    assert weighted_corr(a, b, np.r_[np.full(5, 2.0), np.ones(35)]) == pytest.approx(repeated)


def test_the_ridge_strength_follows_the_signal_and_the_stack_adds_the_rest():
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(200, 5)), np.ones(200)
    assert choose_lambda(x, x @ [1.0, 1.0, 0.0, 0.0, 0.0], w) == LAMBDAS[0]  # exact signal: no shrinkage
    noise = rng.normal(size=(200, 60))  # 60 features of pure noise: fitting them hurts held-out folds, so shrink
    assert choose_lambda(noise, rng.normal(size=200), w) >= 1e3
    genres, title = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
    y = genres[:, 0] + title[:, 1]  # half from each block
    both = stacked(genres[:200], title[:200], y[:200], np.ones(200), genres[200:], title[200:], y[200:], np.ones(100))
    assert both["corr"] > 0.99
