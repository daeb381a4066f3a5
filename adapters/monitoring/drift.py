"""Drift statistics: is a window of traffic still distributed like the training reference?

- Population stability index (PSI) for categorical distributions (predicted labels) and
  binned continuous ones (confidence, input length), with epsilon smoothing of empty bins.
  PSI is the symmetrised Kullback-Leibler divergence (Jeffreys divergence) of the binned
  distributions, from credit scoring; the 0.1 / 0.25 warn / alarm levels are that field's rule
  of thumb (N. Siddiqi, "Credit Risk Scorecards", Wiley 2006; B. Yurdakul, "Statistical
  Properties of Population Stability Index", PhD thesis, Western Michigan University 2018).
- Two-sample Kolmogorov-Smirnov test for input lengths (Kolmogorov 1933, Smirnov 1948;
  ``scipy.stats.ks_2samp``).
- Maximum mean discrepancy (RBF kernel, median-heuristic bandwidth) with a permutation
  p-value for embeddings (A. Gretton et al., "A Kernel Two-Sample Test", JMLR 13, 2012):
  distribution-free, and fast for a few hundred 384-d vectors because the kernel matrix is
  computed once and permutations only re-index it.
- Out-of-vocabulary rate of the window against the training vocabulary.

Each check returns a ``CheckResult`` whose status ("ok", "warn", "alarm", "skipped")
follows ``DriftThresholds``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy.stats import ks_2samp

from adapters.errors import ConfigError
from adapters.monitoring.reference import bin_counts

Status = Literal["ok", "warn", "alarm", "skipped"]
SEVERITY = {"skipped": 0, "ok": 0, "warn": 1, "alarm": 2}


class DriftThresholds(BaseModel):
    """When a statistic is worth a warning, and when an alarm (a retraining trigger).

    Validation rejects unknown keys, out-of-range values and alarm levels below warn levels.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    psi_warn: float = Field(0.1, ge=0, description="PSI above this: moderate shift (warning).")
    psi_alarm: float = Field(0.25, ge=0, description="PSI above this: significant shift (alarm).")
    psi_epsilon: float = Field(1e-4, gt=0, lt=0.01, description="Floor for empty-bin proportions in PSI.")
    p_value: float = Field(0.01, gt=0, lt=1, description="Two-sample tests alarm below this p-value.")
    ks_min_statistic: float = Field(
        0.1, ge=0, le=1, description="KS alarms only if the CDFs also differ by at least this (effect size)."
    )
    mmd_permutations: int = Field(500, ge=20, description="Permutations for the MMD p-value.")
    max_embeddings: int = Field(200, ge=10, description="Window texts embedded for the MMD test (a random sample).")
    oov_warn_increase: float = Field(
        0.03, ge=0, le=1, description="OOV rate above the reference baseline by this: warning."
    )
    oov_alarm_increase: float = Field(
        0.06, ge=0, le=1, description="OOV rate above the reference baseline by this: alarm."
    )
    min_window: int = Field(30, ge=1, description="Fewer records than this: checks are skipped, not guessed.")
    seed: int = Field(0, description="Seed of sampling and permutations (reproducible reports).")

    @model_validator(mode="after")
    def _ordered(self) -> DriftThresholds:
        if self.psi_alarm < self.psi_warn:
            raise ValueError(f"psi_alarm ({self.psi_alarm}) must be >= psi_warn ({self.psi_warn})")
        if self.oov_alarm_increase < self.oov_warn_increase:
            raise ValueError(
                f"oov_alarm_increase ({self.oov_alarm_increase}) must be >= "
                f"oov_warn_increase ({self.oov_warn_increase})"
            )
        return self


def load_thresholds(raw: Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> DriftThresholds:
    """Thresholds from a dict (e.g. a YAML file) plus ``key=value`` overrides (e.g. "psi_alarm=0.3").

    Raises ConfigError naming each bad key: unknown, out of range, or an override without "=".
    """
    data = dict(raw or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"threshold override {item!r} must look like key=value (e.g. psi_alarm=0.3)")
        key, value = item.split("=", 1)
        data[key.strip()] = value.strip()
    try:
        return DriftThresholds.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "thresholds"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown threshold {key!r}; valid keys: {', '.join(DriftThresholds.model_fields)}")
            else:
                problems.append(f"threshold {key!r}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("; ".join(problems)) from None


@dataclass
class CheckResult:
    """One drift check's outcome: status per ``DriftThresholds``, the statistic and p-value it
    rests on (None where the check has none), a one-line explanation, and plot/report data."""

    name: str
    status: Status
    statistic: float | None = None
    p_value: float | None = None
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # what the plots and report.json need

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (numpy scalars as Python numbers, non-finite floats as None)."""
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def worst(statuses: Iterable[str]) -> Status:
    """The most severe of the statuses ("ok" for none; "skipped" ranks with "ok")."""
    out: Status = "ok"
    for s in statuses:
        if SEVERITY[s] > SEVERITY[out]:
            out = s  # type: ignore[assignment]
    return out


# ---------------------------------------------------------------- PSI
def psi(reference: Sequence[float], current: Sequence[float], epsilon: float = 1e-4) -> float:
    """Population stability index of two binned distributions: PSI = sum_i (c_i - r_i) * ln(c_i / r_i).

    reference, current: 1-d counts or proportions over the same bins (equal length, each with a
    positive total). r_i, c_i are the bin proportions. Proportions below `epsilon` are raised to
    it (then renormalised) so an empty bin contributes a large but finite term instead of
    infinity. Returns PSI >= 0 (0: identical); raises ValueError on mismatched or negative input.
    Formula: Siddiqi 2006 / Yurdakul 2018 (see the module docstring).
    """
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"psi needs two 1-d arrays of equal length, got {ref.shape} and {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0 or (ref < 0).any() or (cur < 0).any():
        raise ValueError("psi needs non-negative counts with a positive total on both sides")
    r = np.maximum(ref / ref.sum(), epsilon)
    c = np.maximum(cur / cur.sum(), epsilon)
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def _psi_status(value: float, t: DriftThresholds) -> Status:
    return "alarm" if value > t.psi_alarm else "warn" if value > t.psi_warn else "ok"


def categorical_psi(
    name: str, reference_counts: Mapping[str, int], values: Sequence[str], thresholds: DriftThresholds
) -> CheckResult:
    """PSI of a categorical distribution; categories never seen in the reference count too."""
    values = [str(v) for v in values]
    if len(values) < thresholds.min_window:
        return _skipped(name, f"{len(values)} values in the window, fewer than min_window={thresholds.min_window}")
    if not reference_counts:
        return _skipped(name, "the reference has no distribution for this")
    window_counts: dict[str, int] = {}
    for v in values:
        window_counts[v] = window_counts.get(v, 0) + 1
    categories = list(reference_counts) + sorted(set(window_counts) - set(reference_counts))
    ref = [float(reference_counts.get(c, 0)) for c in categories]
    cur = [float(window_counts.get(c, 0)) for c in categories]
    value = psi(ref, cur, thresholds.psi_epsilon)
    unseen = [c for c in categories if c not in reference_counts]
    detail = f"PSI {value:.3f} over {len(categories)} categories"
    if unseen:
        detail += f"; not in the reference: {', '.join(unseen[:5])}"
    return CheckResult(
        name,
        _psi_status(value, thresholds),
        statistic=value,
        detail=detail,
        data={
            "categories": categories,
            "reference": _proportions(ref),
            "window": _proportions(cur),
            "window_counts": cur,
            "n_window": len(values),
        },
    )


def binned_psi(
    name: str,
    edges: Sequence[float],
    reference_counts: Sequence[int],
    values: Sequence[float],
    thresholds: DriftThresholds,
) -> CheckResult:
    """PSI of a continuous variable binned at the reference's quantile edges.

    edges: the reference's interior bin edges; reference_counts: its len(edges) + 1 bin counts.
    Non-finite and None values are dropped. Raises ConfigError if counts and edges disagree.
    """
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(values) < thresholds.min_window:
        return _skipped(name, f"{len(values)} values in the window, fewer than min_window={thresholds.min_window}")
    if len(reference_counts) != len(edges) + 1:
        raise ConfigError(
            f"reference for {name}: {len(edges)} edges need {len(edges) + 1} counts, got {len(reference_counts)}"
        )
    cur = bin_counts(values, edges)
    value = psi(reference_counts, cur, thresholds.psi_epsilon)
    return CheckResult(
        name,
        _psi_status(value, thresholds),
        statistic=value,
        detail=f"PSI {value:.3f} over {len(cur)} reference-quantile bins; window mean {np.mean(values):.3g}",
        data={
            "edges": list(edges),
            "reference": _proportions(reference_counts),
            "window": _proportions(cur),
            "n_window": len(values),
            "window_mean": float(np.mean(values)),
        },
    )


def _proportions(counts) -> list[float]:
    arr = np.asarray(counts, dtype=np.float64)
    return (arr / arr.sum()).tolist() if arr.sum() > 0 else arr.tolist()


def _skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, "skipped", detail=why)


# ---------------------------------------------------------------- KS
def ks_test(name: str, reference: Sequence[float], values: Sequence[float], thresholds: DriftThresholds) -> CheckResult:
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided, exact or asymptotic
    p-value as scipy chooses) of the reference sample against the window's values.

    The statistic D is the largest gap between the two empirical CDFs. Alarms when p < p_value
    and D >= ks_min_statistic (so a huge window does not alarm on a negligible shift); warns
    when only p < p_value.
    """
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if len(values) < thresholds.min_window:
        return _skipped(name, f"{len(values)} values in the window, fewer than min_window={thresholds.min_window}")
    if len(reference) == 0:
        return _skipped(name, "the reference has no sample for this")
    res = ks_2samp(reference, values)
    stat, p = float(res.statistic), float(res.pvalue)
    significant = p < thresholds.p_value
    status: Status = "alarm" if significant and stat >= thresholds.ks_min_statistic else "warn" if significant else "ok"
    return CheckResult(
        name,
        status,
        statistic=stat,
        p_value=p,
        detail=f"KS D={stat:.3f}, p={p:.2g}; "
        f"median {np.median(reference):.3g} (reference) vs {np.median(values):.3g} (window)",
        data={
            "reference_median": float(np.median(reference)),
            "window_median": float(np.median(values)),
            "n_window": int(len(values)),
        },
    )


# ---------------------------------------------------------------- MMD
def _sq_dists(x: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    return d


def _mmd2_unbiased(k: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) for each row of the boolean matrix in_x.

    k: (N, N) kernel matrix of the pooled sample; in_x: (P, N), True = sample x, False = y.
    Returns (P,). With K0 = K minus its diagonal: sum over x-x pairs = a^T K0 a for the
    indicator a; all permutations at once are a single matrix product, not a loop over index copies.
    """
    a = in_x.astype(np.float64)
    b = 1.0 - a
    m = a.sum(1)
    n = b.sum(1)
    k0 = k - np.diag(np.diag(k))
    a_k0 = a @ k0
    sxx = np.einsum("ij,ij->i", a_k0, a)
    sxy = np.einsum("ij,ij->i", a @ k, b)
    syy = np.einsum("ij,ij->i", b @ k0, b)
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, permutations: int = 500, seed: int = 0, bandwidth: float | None = None
) -> tuple[float, float, np.ndarray, float]:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d), RBF kernel, with a permutation p-value.

    The estimator and the permutation test are Gretton et al., "A Kernel Two-Sample Test",
    JMLR 13 (2012). k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)); the bandwidth defaults to
    sqrt(median / 2) of the pooled sample's nonzero squared pairwise distances (the median
    heuristic). p = (1 + #{null >= observed}) / (1 + permutations), never 0 (Phipson & Smyth,
    "Permutation p-values should never be zero", SAGMB 2010).
    Returns (mmd2, p_value, null distribution of shape (permutations,), bandwidth);
    raises ValueError for arrays that are not 2-d with equal d, or with fewer than 2 rows.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD needs two (n, d) arrays of equal d, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least 2 samples on each side")
    pooled = np.concatenate([x, y])
    d2 = _sq_dists(pooled)
    if bandwidth is None:
        off = d2[np.triu_indices(len(pooled), k=1)]
        med = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
        bandwidth = math.sqrt(med / 2.0)
    k = np.exp(-d2 / (2.0 * bandwidth**2))
    m, total = len(x), len(pooled)
    observed_split = np.zeros((1, total), dtype=bool)
    observed_split[0, :m] = True
    observed = float(_mmd2_unbiased(k, observed_split)[0])
    rng = np.random.default_rng(seed)
    splits = np.zeros((permutations, total), dtype=bool)
    for i in range(permutations):
        splits[i, rng.permutation(total)[:m]] = True
    null = _mmd2_unbiased(k, splits)
    p_value = (1.0 + float(np.sum(null >= observed))) / (1.0 + permutations)
    return observed, p_value, null, bandwidth


def embedding_mmd(
    name: str, reference: np.ndarray | None, window: np.ndarray | None, thresholds: DriftThresholds
) -> CheckResult:
    """MMD permutation test of reference (n, d) against window (m, d) embeddings; alarms at p < p_value.

    The window is subsampled to max_embeddings rows. The result's data carries the null
    distribution and a 2-d PCA projection of both samples, for the plot. Raises ConfigError
    when the two have different d (different base models).
    """
    if reference is None or len(reference) < 2:
        return _skipped(name, "the reference has no embedding sample")
    if window is None or len(window) < min(thresholds.min_window, thresholds.max_embeddings):
        n = 0 if window is None else len(window)
        return _skipped(
            name,
            f"{n} window embeddings (needs texts logged with log_text=True, or embeddings logged at request time)",
        )
    window = np.asarray(window, dtype=np.float64)
    if window.shape[1] != reference.shape[1]:
        raise ConfigError(
            f"window embeddings have {window.shape[1]} dims, the reference {reference.shape[1]}: "
            "they come from different base models"
        )
    rng = np.random.default_rng(thresholds.seed)
    if len(window) > thresholds.max_embeddings:
        window = window[rng.choice(len(window), thresholds.max_embeddings, replace=False)]
    mmd2, p, null, bw = mmd_permutation_test(reference, window, thresholds.mmd_permutations, thresholds.seed)
    status: Status = "alarm" if p < thresholds.p_value else "ok"
    # A 2-d PCA projection of both samples, for the plot.
    pooled = np.concatenate([np.asarray(reference, np.float64), window])
    centered = pooled - pooled.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    proj = centered @ vt[:2].T
    return CheckResult(
        name,
        status,
        statistic=mmd2,
        p_value=p,
        detail=f"MMD^2={mmd2:.4g} (RBF, bandwidth {bw:.3g}), "
        f"permutation p={p:.3g} ({thresholds.mmd_permutations} permutations)",
        data={
            "null": null.tolist(),
            "n_reference": int(len(reference)),
            "n_window": int(len(window)),
            "bandwidth": bw,
            "pca_reference": proj[: len(reference)].round(5).tolist(),
            "pca_window": proj[len(reference) :].round(5).tolist(),
        },
    )


# ---------------------------------------------------------------- OOV
def oov_rate_check(
    name: str, baseline_rate: float, oov_tokens: int, total_tokens: int, n_records: int, thresholds: DriftThresholds
) -> CheckResult:
    """Out-of-vocabulary token rate of the window (oov_tokens / total_tokens) against the reference's
    held-out baseline rate; warns / alarms when it exceeds the baseline by oov_warn_increase /
    oov_alarm_increase (absolute rates in [0, 1])."""
    if n_records < thresholds.min_window or total_tokens <= 0:
        return _skipped(
            name,
            f"{n_records} records with OOV counts (needs log_text=True, or the logger given the reference vocabulary)",
        )
    rate = oov_tokens / total_tokens
    increase = rate - baseline_rate
    status: Status = "ok"
    if increase > thresholds.oov_alarm_increase:
        status = "alarm"
    elif increase > thresholds.oov_warn_increase:
        status = "warn"
    return CheckResult(
        name,
        status,
        statistic=rate,
        detail=f"OOV rate {rate:.3f} vs {baseline_rate:.3f} on held-out training data ({increase:+.3f})",
        data={
            "baseline": baseline_rate,
            "increase": increase,
            "oov_tokens": oov_tokens,
            "total_tokens": total_tokens,
            "n_window": n_records,
        },
    )
