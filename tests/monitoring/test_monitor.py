"""Drift monitoring end to end: planted drift is detected, a fresh same-distribution sample is not.

Reference: TREC questions (labels, confidences, token lengths with MiniLM's real tokenizer,
embeddings from a tiny random-weight BERT on that tokenizer). Windows of 300 logged requests:
a held-out TREC sample (no alarm), a shifted label mix, longer inputs, and SMS messages (another
domain). Seeds are fixed, so outcomes are deterministic; margins were checked over several seeds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from adapters.data.builtins import BUILTIN_DATASETS
from adapters.monitoring.drift import DriftThresholds
from adapters.monitoring.monitor import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, _bin_names, build_report, monitor
from adapters.monitoring.reference import Reference, build_reference, embedder
from adapters.monitoring.traffic_log import TrafficLogger, read_window
from adapters.store.manifest import build_manifest, write_manifest

N_REF, N_WINDOW = 1500, 300
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trec():
    ds = BUILTIN_DATASETS["trec"].load()
    first_label: dict[str, str] = {}
    for text, label in zip(ds["text"], ds["label"]):
        first_label.setdefault(text, label)
    texts = list(first_label)
    labels = [first_label[t] for t in texts]
    order = np.random.default_rng(0).permutation(len(texts))
    return texts, labels, order[:N_REF], order[N_REF:]


@pytest.fixture(scope="module")
def embed(tiny_bert_dir, one_torch_thread):
    return embedder(str(tiny_bert_dir))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, trec, embed, tiny_bert_dir):
    """An adapter folder whose manifest carries a TREC reference (as training writes it)."""
    texts, labels, ref_idx, _ = trec
    rng = np.random.default_rng(1)
    ref = build_reference(
        [texts[i] for i in ref_idx],
        [labels[i] for i in ref_idx],
        tokenizer=embed.tokenizer,
        predictions=[labels[i] for i in ref_idx],
        confidences=rng.beta(5, 1, N_REF),  # a confident classifier
        embed_fn=embed,
        embed_model=str(tiny_bert_dir),
    )
    folder = tmp_path_factory.mktemp("adapter")
    stats = ref.save(folder)
    manifest = build_manifest(
        name="trec-clf",
        version=1,
        task="sequence-classification",
        method="lora",
        base_model={
            "name": str(tiny_bert_dir),
            "path": str(tiny_bert_dir),
            "revision": None,
            "fingerprint": None,
            "tokenizer_fingerprint": None,
        },
        labels=sorted(set(labels)),
        reference=stats,
        code_revision=None,
    )
    write_manifest(folder, manifest)
    return folder


def _window(trec, scenario: str, seed: int = 100):
    """(texts, predicted labels, confidences) of one planted scenario."""
    texts, labels, _, hold = trec
    rng = np.random.default_rng(seed)
    if scenario == "same":
        idx = rng.choice(hold, N_WINDOW, replace=False)
    elif scenario == "label_mix":  # users now only ask about people and places
        idx = rng.choice([i for i in hold if labels[i] in ("HUM", "LOC")], N_WINDOW, replace=False)
    elif scenario == "longer":  # same questions, only the longest 30%
        lengths = np.array([len(texts[i]) for i in hold])
        idx = rng.choice(hold[lengths > np.quantile(lengths, 0.7)], N_WINDOW, replace=False)
    elif scenario == "domain":
        sms = BUILTIN_DATASETS["sms-spam"].load()["text"]
        chosen = rng.choice(len(sms), N_WINDOW, replace=False)
        # The classifier still answers with its labels, less confidently, mostly "ENTY".
        preds = rng.choice(["ENTY", "HUM", "DESC"], N_WINDOW, p=[0.6, 0.2, 0.2]).tolist()
        return [sms[i] for i in chosen], preds, rng.beta(2, 2, N_WINDOW)
    else:
        raise ValueError(scenario)
    return [texts[i] for i in idx], [labels[i] for i in idx], rng.beta(5, 1, N_WINDOW)


def _log(path: Path, window, **logger_kwargs) -> Path:
    texts, preds, confs = window
    with TrafficLogger(path, **logger_kwargs) as logger:
        for text, pred, conf in zip(texts, preds, confs):
            logger.log(
                {"adapter": "trec-clf@1", "text": text, "label": pred, "confidence": float(conf), "latency_ms": 3.0}
            )
    return path


EXPECTED_ALARMS = {
    "same": set(),
    "label_mix": {"label_psi"},
    "longer": {"length_psi", "length_ks"},
    "domain": {"embedding_mmd", "oov_rate", "length_ks", "label_psi", "confidence_psi"},
}


@pytest.mark.parametrize("scenario", list(EXPECTED_ALARMS))
def test_planted_drift_is_detected_and_same_distribution_is_not(tmp_path, trec, adapter_dir, embed, scenario):
    log_path = _log(tmp_path / "traffic.jsonl", _window(trec, scenario), log_text=True)
    report = monitor(str(adapter_dir), log_path, tmp_path / "report", plots=False, embed_fn=embed)
    statuses = {c.name: c.status for c in report.checks}
    assert "skipped" not in statuses.values(), statuses
    alarms = {name for name, status in statuses.items() if status == "alarm"}
    assert EXPECTED_ALARMS[scenario] <= alarms, statuses
    if scenario == "same":
        assert set(statuses.values()) == {"ok"}, [(c.name, c.status, c.statistic, c.p_value) for c in report.checks]
        assert report.exit_code == EXIT_OK and not report.drifted
    else:
        assert report.status == "alarm" and report.exit_code == EXIT_DRIFT
    assert report.adapter == "trec-clf@1" and report.n_records == N_WINDOW


def test_private_logging_still_detects_domain_drift(tmp_path, trec, adapter_dir, embed, one_torch_thread):
    """Without raw text, the logger records OOV counts and embeddings at request time."""
    reference = Reference.load(adapter_dir)
    kwargs = {"tokenizer": embed.tokenizer, "vocabulary": reference.vocabulary, "embed_fn": embed}
    domain = _log(tmp_path / "domain.db", _window(trec, "domain"), **kwargs)
    same = _log(tmp_path / "same.db", _window(trec, "same", seed=7), **kwargs)
    assert not any("text" in r for r in read_window(domain))
    drifted = build_report(read_window(domain), reference, DriftThresholds())
    assert drifted.check("embedding_mmd").status == "alarm" and drifted.check("oov_rate").status == "alarm"
    fine = build_report(read_window(same), reference, DriftThresholds())
    assert fine.status == "ok", [(c.name, c.status, c.statistic) for c in fine.checks]


def test_report_files_and_plots(tmp_path, trec, adapter_dir):
    log_path = _log(tmp_path / "traffic.jsonl", _window(trec, "domain"), log_text=True)
    out = tmp_path / "report"
    report = monitor(str(adapter_dir), log_path, out, traffic_adapter="trec-clf@1")
    data = json.loads((out / "report.json").read_text())
    assert data["status"] == "alarm" and data["exit_code"] == EXIT_DRIFT and data["n_records"] == N_WINDOW
    assert {c["name"] for c in data["checks"]} == {
        "label_psi",
        "confidence_psi",
        "length_psi",
        "length_ks",
        "embedding_mmd",
        "oov_rate",
    }
    for name in ("labels.png", "confidence.png", "length.png", "embedding.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in (out / "report.md").read_text()
    md = (out / "report.md").read_text()
    assert "Status: ALARM" in md and "| embedding_mmd | ALARM |" in md
    assert report.window["versions_seen"] == ["trec-clf@1"]


def test_too_small_window_skips_instead_of_guessing(tmp_path, trec, adapter_dir, embed):
    texts, preds, confs = _window(trec, "domain")
    log_path = _log(tmp_path / "t.jsonl", (texts[:10], preds[:10], confs[:10]), log_text=True)
    report = monitor(str(adapter_dir), log_path, tmp_path / "r", plots=False, embed_fn=embed)
    assert {c.status for c in report.checks} == {"skipped"}
    assert report.exit_code == EXIT_OK and "min_window" in report.check("label_psi").detail


@pytest.fixture(scope="module")
def monitor_script():
    spec = importlib.util.spec_from_file_location("monitor_script", ROOT / "scripts" / "monitor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_exit_codes(tmp_path, trec, adapter_dir, monitor_script, capsys):
    same = _log(tmp_path / "same.jsonl", _window(trec, "same"), log_text=True)
    longer = _log(tmp_path / "longer.jsonl", _window(trec, "longer"), log_text=True)
    args = ["--adapter", str(adapter_dir), "--no-plots", "--no-embed"]
    assert monitor_script.main(args + ["--traffic", str(same), "--out", str(tmp_path / "a")]) == EXIT_OK
    assert "OK over 300 records" in capsys.readouterr().out
    assert monitor_script.main(args + ["--traffic", str(longer), "--out", str(tmp_path / "b"), "--json"]) == EXIT_DRIFT
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "alarm" and "data" not in printed["checks"][0]
    # Looser thresholds from a file: the same window no longer alarms on length.
    (tmp_path / "t.yaml").write_text("psi_alarm: 100\npsi_warn: 50\nks_min_statistic: 0.9\n")
    loose = ["--thresholds", str(tmp_path / "t.yaml")]
    code = monitor_script.main(
        args + ["--traffic", str(longer), "--out", str(tmp_path / "c"), *loose, "--set", "p_value=0.001"]
    )
    assert code == EXIT_OK, capsys.readouterr().out
    # --fail-on warn turns the KS warning (significant, small effect) into a failure.
    code = monitor_script.main(
        args + ["--traffic", str(longer), "--out", str(tmp_path / "d"), *loose, "--fail-on", "warn"]
    )
    assert code == EXIT_DRIFT
    capsys.readouterr()
    missing = ["--adapter", str(tmp_path / "nope"), "--traffic", str(same), "--out", str(tmp_path / "e")]
    code = monitor_script.main(missing)
    assert code == EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err
    code = monitor_script.main(args + ["--traffic", str(same), "--out", str(tmp_path / "f"), "--set", "psi_alrm=1"])
    assert code == EXIT_ERROR
    assert "valid keys" in capsys.readouterr().err


def test_bin_names_read_as_ranges():
    assert _bin_names([6.0, 7.0, 9.0, 12.0], ".0f") == ["<=6", "7", "8-9", "10-12", ">12"]
    assert _bin_names([0.5, 0.75], ".2f") == ["<=0.50", "0.50-0.75", ">0.75"]
