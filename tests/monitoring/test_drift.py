"""Drift statistics: PSI, KS, MMD with permutations, OOV rate, thresholds config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapters.errors import ConfigError
from adapters.monitoring.drift import (
    DriftThresholds,
    binned_psi,
    categorical_psi,
    embedding_mmd,
    ks_test,
    load_thresholds,
    mmd_permutation_test,
    oov_rate_check,
    psi,
    worst,
)
from adapters.monitoring.reference import bin_counts, quantile_edges

T = DriftThresholds()


def test_psi_matches_the_formula():
    ref, cur = [50, 30, 20], [30, 30, 40]
    r, c = np.array(ref) / 100, np.array(cur) / 100
    assert psi(ref, cur) == pytest.approx(float(np.sum((c - r) * np.log(c / r))), rel=1e-3)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert psi([0.5, 0.5], [100, 100]) == pytest.approx(0.0, abs=1e-12)  # counts or proportions
    assert psi(ref, cur) == pytest.approx(psi(cur, ref), rel=1e-9)  # symmetric


def test_psi_epsilon_keeps_empty_bins_finite():
    value = psi([10, 10, 0], [10, 10, 10], epsilon=1e-4)
    assert math.isfinite(value) and value > 1.0
    assert psi([10, 10, 0], [10, 10, 10], epsilon=1e-3) < value  # a larger floor caps the term lower


@pytest.mark.parametrize("ref,cur", [([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, -1], [1, 1]), ([], [])])
def test_psi_rejects_bad_input(ref, cur):
    with pytest.raises(ValueError):
        psi(ref, cur)


def test_categorical_psi_counts_unseen_categories():
    ref = {"a": 50, "b": 50}
    same = categorical_psi("labels", ref, ["a"] * 48 + ["b"] * 52, T)
    assert same.status == "ok" and same.statistic < 0.01
    shifted = categorical_psi("labels", ref, ["a"] * 40 + ["b"] * 30 + ["c"] * 30, T)
    assert shifted.status == "alarm"
    assert shifted.data["categories"] == ["a", "b", "c"] and "not in the reference: c" in shifted.detail
    moderate = categorical_psi("labels", ref, ["a"] * 66 + ["b"] * 34, T)  # PSI ~ 0.10-0.25
    assert moderate.status == "warn", moderate.statistic
    assert categorical_psi("labels", ref, ["a"] * 5, T).status == "skipped"  # below min_window
    assert categorical_psi("labels", {}, ["a"] * 50, T).status == "skipped"


def test_binned_psi_uses_reference_edges():
    rng = np.random.default_rng(0)
    ref_values = rng.normal(0, 1, 5000)

    edges = quantile_edges(ref_values)
    counts = bin_counts(ref_values, edges)
    assert sum(counts) == 5000 and max(counts) - min(counts) < 10  # deciles
    assert binned_psi("x", edges, counts, rng.normal(0, 1, 500), T).status == "ok"
    moved = binned_psi("x", edges, counts, rng.normal(1.0, 1, 500), T)
    assert moved.status == "alarm" and moved.statistic > 0.25
    with pytest.raises(ConfigError, match="edges need"):
        binned_psi("x", edges, counts[:-1], rng.normal(0, 1, 500), T)


def test_bin_counts_boundaries():
    # bins: (-inf, 1], (1, 2], (2, inf)
    assert bin_counts([0, 1, 1.5, 2, 3, 100], [1, 2]) == [2, 2, 2]
    assert bin_counts([5, 6], []) == [2]


def test_ks_alarms_on_shift_with_effect_size():
    rng = np.random.default_rng(1)
    ref = rng.poisson(12, 2000)
    assert ks_test("len", ref, rng.poisson(12, 300), T).status == "ok"
    longer = ks_test("len", ref, rng.poisson(20, 300), T)
    assert longer.status == "alarm" and longer.p_value < 1e-6 and longer.statistic > 0.5
    # Significant but tiny: a huge window detects a 0.3-token shift; not worth an alarm.
    tiny = ks_test("len", rng.normal(12, 3, 20000), rng.normal(12.3, 3, 20000), T)
    assert tiny.p_value < 0.01 and tiny.statistic < 0.1 and tiny.status == "warn"


def test_mmd_permutation_test_calibration_and_power():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 384))
    same = mmd_permutation_test(x, rng.normal(size=(150, 384)), permutations=200, seed=0)
    assert same[1] > 0.05
    shifted = mmd_permutation_test(x, rng.normal(size=(150, 384)) + 0.15, permutations=200, seed=0)
    assert shifted[1] < 0.01 and shifted[0] > same[0]
    assert len(shifted[2]) == 200 and shifted[3] > 0
    # p-values of same-distribution pairs are spread over (0, 1], not stuck near 0
    ps = [mmd_permutation_test(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), 100, s)[1] for s in range(20)]
    assert sum(p < 0.05 for p in ps) <= 3 and max(ps) > 0.5


def test_embedding_mmd_check():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(200, 32)).astype(np.float32)
    assert embedding_mmd("emb", ref, rng.normal(size=(300, 32)), T).status == "ok"
    drift = embedding_mmd("emb", ref, rng.normal(size=(300, 32)) * 1.5, T)
    assert drift.status == "alarm" and drift.data["n_window"] == T.max_embeddings  # sampled down
    assert len(drift.data["pca_window"]) == T.max_embeddings
    assert embedding_mmd("emb", None, ref, T).status == "skipped"
    assert embedding_mmd("emb", ref, None, T).status == "skipped"
    with pytest.raises(ConfigError, match="different base models"):
        embedding_mmd("emb", ref, rng.normal(size=(100, 16)), T)


def test_oov_rate_check_levels():
    assert oov_rate_check("oov", 0.10, 110, 1000, 100, T).status == "ok"
    assert oov_rate_check("oov", 0.10, 140, 1000, 100, T).status == "warn"
    alarm = oov_rate_check("oov", 0.10, 200, 1000, 100, T)
    assert alarm.status == "alarm" and alarm.statistic == pytest.approx(0.2)
    assert alarm.data["increase"] == pytest.approx(0.1)
    assert oov_rate_check("oov", 0.10, 0, 0, 0, T).status == "skipped"


def test_thresholds_config_errors_name_the_key():
    t = load_thresholds({"psi_alarm": 0.3}, ["p_value=0.05"])
    assert t.psi_alarm == 0.3 and t.p_value == 0.05 and t.psi_warn == 0.1
    with pytest.raises(ConfigError, match="unknown threshold 'psi_alrm'; valid keys: psi_warn"):
        load_thresholds({"psi_alrm": 0.3})
    with pytest.raises(ConfigError, match="'p_value'"):
        load_thresholds({}, ["p_value=2"])
    with pytest.raises(ConfigError, match="psi_alarm .* must be >= psi_warn"):
        load_thresholds({"psi_warn": 0.3, "psi_alarm": 0.2})
    with pytest.raises(ConfigError, match="key=value"):
        load_thresholds({}, ["p_value"])


def test_worst_status():
    assert worst(["ok", "skipped"]) == "ok"
    assert worst(["ok", "warn", "skipped"]) == "warn"
    assert worst(["warn", "alarm", "ok"]) == "alarm"


def test_mmd_statistic_equals_the_direct_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(40, 5)) + 0.3
    bw = 1.7

    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * bw**2))

    kxx, kyy = k(x, x), k(y, y)
    direct = (kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (40 * 39) - 2 * k(x, y).mean()
    assert mmd_permutation_test(x, y, 20, 0, bandwidth=bw)[0] == pytest.approx(direct, rel=1e-9)
