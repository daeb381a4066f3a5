"""Drift report: a window of logged traffic against an adapter's training reference.

``monitor(...)`` resolves the adapter (store reference or folder), reads its reference,
reads the traffic window, runs the checks of ``adapters.monitoring.drift`` and writes ``report.md``,
``report.json`` and PNG plots. ``DriftReport.exit_code`` is what ``adapterkit monitor``
exits with, so a scheduler can trigger retraining: 0 no drift, 1 drift past thresholds,
2 the monitor could not run (bad input).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from adapters.errors import ConfigError
from adapters.modeling.builtins import resolve_model
from adapters.monitoring.drift import (
    SEVERITY,
    CheckResult,
    DriftThresholds,
    binned_psi,
    categorical_psi,
    embedding_mmd,
    ks_test,
    oov_rate_check,
    worst,
)
from adapters.monitoring.reference import Reference, embedder
from adapters.monitoring.traffic_log import read_window, token_counts
from adapters.store.store import AdapterStore

log = logging.getLogger(__name__)

REPORT_FORMAT = "adapterkit.drift-report/1"
EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


@dataclass
class DriftReport:
    """The outcome of every drift check on one traffic window (see ``build_report``)."""

    adapter: str
    status: str  # worst check status: ok | warn | alarm
    n_records: int
    window: dict[str, Any]
    checks: list[CheckResult]
    thresholds: DriftThresholds
    fail_on: str = "alarm"
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    plots: dict[str, str] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        """Whether the worst status reaches fail_on ("warn" or "alarm")."""
        return SEVERITY[self.status] >= SEVERITY[self.fail_on]

    @property
    def exit_code(self) -> int:
        """EXIT_DRIFT when drifted, else EXIT_OK (what a scheduler acts on)."""
        return EXIT_DRIFT if self.drifted else EXIT_OK

    def check(self, name: str) -> CheckResult:
        """The check called `name`; KeyError listing the checks if there is none."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    def to_dict(self, with_data: bool = True) -> dict[str, Any]:
        """report.json's content; with_data=False leaves out each check's plot data."""
        checks = []
        for c in self.checks:
            d = c.to_dict()
            if not with_data:
                d.pop("data", None)
            elif c.name == "embedding_mmd":  # the plot has the projections; keep report.json small
                d["data"] = {k: v for k, v in d["data"].items() if not k.startswith("pca_") and k != "null"}
            checks.append(d)
        return {
            "format": REPORT_FORMAT,
            "adapter": self.adapter,
            "status": self.status,
            "drifted": self.drifted,
            "fail_on": self.fail_on,
            "exit_code": self.exit_code,
            "created_at": self.created_at,
            "n_records": self.n_records,
            "window": self.window,
            "thresholds": self.thresholds.model_dump(),
            "checks": checks,
            "plots": self.plots,
        }


# ---------------------------------------------------------------- window features
def _texts(records: Sequence[dict]) -> list[str]:
    return [r["text"] for r in records if isinstance(r.get("text"), str)]


def window_lengths(records: Sequence[dict], tokenizer=None) -> list[int]:
    """Input length in tokens of each record: logged, else counted from logged text.

    Records with neither are left out.
    """
    out = []
    for r in records:
        if r.get("input_tokens") is not None:
            out.append(int(r["input_tokens"]))
        elif isinstance(r.get("text"), str) and tokenizer is not None:
            out.append(len(token_counts(tokenizer, r["text"])))
    return out


def window_oov(records: Sequence[dict], vocabulary: frozenset[int], tokenizer=None) -> tuple[int, int, int]:
    """(oov tokens, tokens, records counted): from logged token ids, logged OOV counts, or re-tokenized text."""
    oov = total = n = 0
    for r in records:
        if isinstance(r.get("token_ids"), list):
            ids = r["token_ids"]
            oov += sum(1 for i in ids if i not in vocabulary)
            total += len(ids)
        elif r.get("oov_tokens") is not None and r.get("input_tokens"):
            oov += int(r["oov_tokens"])
            total += int(r["input_tokens"])
        elif isinstance(r.get("text"), str) and tokenizer is not None:
            ids = token_counts(tokenizer, r["text"])
            oov += sum(1 for i in ids if i not in vocabulary)
            total += len(ids)
        else:
            continue
        n += 1
    return oov, total, n


def window_embeddings(
    records: Sequence[dict], embed_fn: Callable[[list[str]], Any] | None, limit: int, seed: int
) -> np.ndarray | None:
    """Logged embeddings if the records carry them, else embeddings of logged texts (a sample)."""
    logged = [r["embedding"] for r in records if isinstance(r.get("embedding"), list)]
    if logged:
        return np.asarray(logged, dtype=np.float32)
    texts = _texts(records)
    if not texts or embed_fn is None:
        return None
    if len(texts) > limit:
        rng = np.random.default_rng(seed)
        texts = [texts[i] for i in sorted(rng.choice(len(texts), limit, replace=False))]
    return np.asarray(embed_fn(texts), dtype=np.float32)


def build_report(
    records: Sequence[dict],
    reference: Reference,
    thresholds: DriftThresholds | None = None,
    *,
    adapter: str = "",
    tokenizer=None,
    embed_fn: Callable[[list[str]], Any] | None = None,
    window: dict[str, Any] | None = None,
    fail_on: str = "alarm",
) -> DriftReport:
    """Run every drift check of a traffic window against a reference.

    tokenizer: the base tokenizer, used only for records that logged text but no counts.
    embed_fn: texts -> embeddings with the base model (``adapters.monitoring.reference.embedder``), used
    only when records logged text but no embeddings.
    """
    if fail_on not in ("warn", "alarm"):
        raise ConfigError(f"fail_on {fail_on!r} is unknown; valid choices: warn, alarm")
    t = thresholds or DriftThresholds()
    stats = reference.stats
    checks: list[CheckResult] = []

    ref_labels = (stats.get("labels") or {}).get("counts") or {}
    labels = [str(r["label"]) for r in records if r.get("label") is not None]
    checks.append(categorical_psi("label_psi", ref_labels, labels, t))

    confidences = [r["confidence"] for r in records if r.get("confidence") is not None]
    conf_ref = stats.get("confidence")
    if conf_ref:
        checks.append(binned_psi("confidence_psi", conf_ref["edges"], conf_ref["counts"], confidences, t))
    else:
        checks.append(CheckResult("confidence_psi", "skipped", detail="the reference has no confidences"))

    lengths = window_lengths(records, tokenizer)
    checks.append(binned_psi("length_psi", stats["length"]["edges"], stats["length"]["counts"], lengths, t))
    checks.append(ks_test("length_ks", reference.lengths, lengths, t))

    embeddings = window_embeddings(records, embed_fn, t.max_embeddings, t.seed)
    checks.append(embedding_mmd("embedding_mmd", reference.embeddings, embeddings, t))

    oov, total, n_oov = window_oov(records, reference.vocabulary, tokenizer)
    checks.append(oov_rate_check("oov_rate", stats["vocabulary"]["baseline_oov_rate"], oov, total, n_oov, t))

    if len(records) < t.min_window:
        log.warning("only %d records in the window (min_window=%d): checks skipped", len(records), t.min_window)
    return DriftReport(
        adapter=adapter,
        status=worst(c.status for c in checks),
        n_records=len(records),
        window=window or {},
        checks=checks,
        thresholds=t,
        fail_on=fail_on,
    )


# ---------------------------------------------------------------- plots
def _plot_bars(ax, names, ref, win, title):
    x = np.arange(len(names))
    ax.bar(x - 0.2, ref, width=0.4, label="reference")
    ax.bar(x + 0.2, win, width=0.4, label="window")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend()


def _bin_names(edges: Sequence[float], fmt: str) -> list[str]:
    if not edges:
        return ["all"]
    if all(float(e).is_integer() for e in edges):  # integer bins (a, b] are the values a+1..b
        ints = [int(e) for e in edges]
        middle = [str(b) if b == a + 1 else f"{a + 1}-{b}" for a, b in zip(ints[:-1], ints[1:])]
        return [f"<={ints[0]}", *middle, f">{ints[-1]}"]
    names = [f"<={edges[0]:{fmt}}"]
    names += [f"{a:{fmt}}-{b:{fmt}}" for a, b in zip(edges[:-1], edges[1:])]
    names.append(f">{edges[-1]:{fmt}}")
    return names


def write_plots(report: DriftReport, out_dir: Path) -> dict[str, str]:
    """PNG plots of the checks that ran (label / confidence / length bars, embedding MMD); returns {name: file}.

    Figures are made without pyplot, so no GUI backend is needed and the caller's is left alone.
    """
    plots: dict[str, str] = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plots[name.rsplit(".", 1)[0]] = name

    specs = [
        ("label_psi", "labels.png", "predicted labels", None),
        ("confidence_psi", "confidence.png", "confidence (reference quantile bins)", ".2f"),
        ("length_psi", "length.png", "input length in tokens (reference quantile bins)", ".0f"),
    ]
    for check_name, fname, title, fmt in specs:
        c = report.check(check_name)
        if c.status == "skipped":
            continue
        names = c.data["categories"] if fmt is None else _bin_names(c.data["edges"], fmt)
        fig = Figure(figsize=(7, 3.8))
        ax = fig.subplots()
        _plot_bars(ax, names, c.data["reference"], c.data["window"], f"{title}\nPSI {c.statistic:.3f} ({c.status})")
        save(fig, fname)

    c = report.check("embedding_mmd")
    if c.status != "skipped":
        fig = Figure(figsize=(10, 3.8))
        a1, a2 = fig.subplots(1, 2)
        a1.hist(c.data["null"], bins=30, color="0.6", label="permutation null")
        a1.axvline(c.statistic, color="C3", label=f"observed (p={c.p_value:.3g})")
        a1.set_title("embedding MMD^2")
        a1.legend(fontsize=8)
        ref = np.asarray(c.data["pca_reference"])
        win = np.asarray(c.data["pca_window"])
        a2.scatter(ref[:, 0], ref[:, 1], s=8, alpha=0.6, label="reference")
        a2.scatter(win[:, 0], win[:, 1], s=8, alpha=0.6, label="window")
        a2.set_title("embeddings, first two principal components")
        a2.legend(fontsize=8)
        save(fig, "embedding.png")
    return plots


# ---------------------------------------------------------------- markdown
_ICON = {"ok": "ok", "warn": "WARN", "alarm": "ALARM", "skipped": "skipped"}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: DriftReport) -> str:
    """report.md: status, window, one table row per check, thresholds and the plots."""
    lines = [
        f"# Drift report: {report.adapter or '(adapter)'}",
        "",
        f"**Status: {report.status.upper()}**"
        + (" - past thresholds, retraining suggested" if report.drifted else "")
        + f" (fails on: {report.fail_on})",
        "",
        f"- Created: {report.created_at}",
        f"- Records in the window: {report.n_records}",
    ]
    for key, value in report.window.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"- {key.replace('_', ' ').capitalize()}: {shown}")
    lines += ["", "| check | status | statistic | p-value | detail |", "|---|---|---|---|---|"]
    for c in report.checks:
        detail = c.detail.replace("|", "\\|")
        lines.append(f"| {c.name} | {_ICON[c.status]} | {_fmt(c.statistic)} | {_fmt(c.p_value)} | {detail} |")
    t = report.thresholds
    lines += [
        "",
        f"Thresholds: PSI warn > {t.psi_warn}, alarm > {t.psi_alarm}; two-sample tests alarm at p < {t.p_value} "
        f"(KS also needs D >= {t.ks_min_statistic}); OOV rate alarm at +{t.oov_alarm_increase} "
        f"(warn +{t.oov_warn_increase}) over the reference baseline; fewer than {t.min_window} records: skipped.",
    ]
    if report.plots:
        lines += ["", "## Plots", ""]
        for name, fname in report.plots.items():
            lines += [f"![{name}]({fname})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_report(report: DriftReport, out_dir: str | os.PathLike, plots: bool = True) -> Path:
    """Write report.md, report.json and (plots=True) PNGs into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report.plots = write_plots(report, out)
    _write_text_atomic(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    _write_text_atomic(out / "report.md", render_markdown(report))
    return out


# ---------------------------------------------------------------- end to end
def load_adapter_reference(
    ref: str | os.PathLike, store_root: str | os.PathLike | None = None
) -> tuple[Path, dict, Reference]:
    """(folder, manifest, reference) of a store reference (name@version, name@prod) or a folder.

    Raises ConfigError when the adapter has no manifest or no drift reference.
    """
    folder, manifest = AdapterStore(store_root).resolve(str(ref) if not isinstance(ref, Path) else ref)
    if manifest is None:
        raise ConfigError(f"{folder} has no manifest.json, so no training reference to compare with")
    if not manifest.get("reference"):
        raise ConfigError(
            f"adapter {ref} has no drift reference (manifest key 'reference'): train it with a version of "
            "adapterkit that records one, or add one to its unpublished run folder with "
            "adapters.monitoring.reference.attach_reference(<run>/adapter) and publish that"
        )
    return Path(folder), manifest, Reference.load(folder, manifest["reference"])


def monitor(
    adapter_ref: str,
    traffic_log: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    store_root: str | os.PathLike | None = None,
    traffic_adapter: str | None = None,
    since=None,
    until=None,
    limit: int | None = None,
    thresholds: DriftThresholds | None = None,
    fail_on: str = "alarm",
    embed: bool = True,
    plots: bool = True,
    embed_fn: Callable[[list[str]], Any] | None = None,
) -> DriftReport:
    """Compare traffic of an adapter with its training reference and write the report into out_dir.

    adapter_ref: a store reference (name, name@3, name@prod) or an adapter folder.
    traffic_log: the JSONL / SQLite log of ``adapters.monitoring.traffic_log``; since / until
    bound the window (epoch seconds, ISO-8601 or a duration ago such as "24h"), limit keeps
    the most recent records. traffic_adapter: how the adapter is named in the log (default:
    the stored name, matching every version). The base model (from the manifest) is loaded
    only if records logged text without embeddings (and embed is true), unless embed_fn
    (``adapters.monitoring.reference.embedder``, with its ``tokenizer`` attribute) is given to
    reuse an already loaded one. Returns the report; raises ConfigError on bad input.
    """
    folder, manifest, reference = load_adapter_reference(adapter_ref, store_root)
    name = manifest.get("name") or folder.name
    version = manifest.get("version")
    label = f"{name}@{version}" if version is not None else str(adapter_ref)
    records = read_window(traffic_log, adapter=traffic_adapter or name, since=since, until=until, limit=limit)
    failed = [r for r in records if (r.get("status") or 200) >= 400]
    records = [r for r in records if (r.get("status") or 200) < 400]  # rejected requests have no prediction
    t = thresholds or DriftThresholds()
    tokenizer, embed_fn = _base_model_tools(records, reference, manifest, embed_fn if embed else None, embed)

    times = [r["timestamp"] for r in records]
    window = {
        "traffic_log": str(traffic_log),
        "adapter_filter": traffic_adapter or name,
        "from": datetime.fromtimestamp(min(times), timezone.utc).isoformat(timespec="seconds") if times else None,
        "to": datetime.fromtimestamp(max(times), timezone.utc).isoformat(timespec="seconds") if times else None,
        "versions_seen": sorted({str(r.get("adapter")) for r in records}),
        "failed_requests_excluded": len(failed),
    }
    report = build_report(
        records, reference, t, adapter=label, tokenizer=tokenizer, embed_fn=embed_fn, window=window, fail_on=fail_on
    )
    write_report(report, out_dir, plots=plots)
    return report


def _base_model_tools(records: Sequence[dict], reference: Reference, manifest: dict, embed_fn, embed: bool):
    """(tokenizer, embed_fn) for records that logged text but no token counts or embeddings.

    Loads the manifest's base model (its embedder, which brings the tokenizer) only when
    embeddings are missing, else just its tokenizer, else nothing; either may stay None.
    """
    tokenizer = getattr(embed_fn, "tokenizer", None)
    has_text = any("text" in r for r in records)
    needs_tokens = tokenizer is None and any(
        r.get("input_tokens") is None or ("oov_tokens" not in r and "token_ids" not in r)
        for r in records
        if "text" in r
    )
    needs_embed = (
        embed
        and embed_fn is None
        and reference.embeddings is not None
        and has_text
        and not any("embedding" in r for r in records)
    )
    base = manifest.get("base_model") or {}
    # The recorded path, if it exists here; else the name (a built-in or hub id resolves anywhere).
    base_path = base.get("path") if base.get("path") and Path(base["path"]).exists() else base.get("name")
    if (needs_tokens or needs_embed) and base_path:
        if needs_embed:
            embed_fn = embedder(str(base_path), revision=base.get("revision"))
            tokenizer = embed_fn.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(base_path)), revision=base.get("revision"))
    return tokenizer, embed_fn
