"""vLLM (CPU build, its own virtualenv) serving adapterkit's LoRA adapters, checked against adapterkit's engine.

One server, started the way users start it (``scripts/serve.py --engine vllm``), resolves store references
through our plugin (adapters.serving.vllm_plugin): ``smol@prod`` is served, an adapter trained on another
base and a tampered one are refused, a moved tag is picked up after an unload. ``adapterkit parity
--runtime vllm`` starts a server of its own, for an adapter trained a few steps by our loop and its own
held-out rows, and for its merged export served as the model. vLLM's start costs ~1 minute on 2 cores, three times.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from adapters.cli.export import main as export_main
from adapters.cli.parity import main as parity_main
from adapters.serving.vllm_runtime import VLLMServer, completion_logprobs, free_port, vllm_python
from adapters.store.fingerprint import fingerprint_model
from adapters.store.manifest import read_manifest, write_manifest
from adapters.store.store import AdapterStore
from tests.helpers.runtimes import (
    PROMPTS,
    engine_answers,
    max_prob_diff,
    need_runtime,
    smol_lora,
    trained_smol_lora,
)

pytestmark = [pytest.mark.real_model, pytest.mark.runtime]

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4  # as `adapterkit parity`'s default (probabilities in the server tests, logprobs in parity)


@pytest.fixture(scope="module")
def vllm_ready():
    need_runtime(vllm_python)


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm2_dir, tiny_llama_dir) -> AdapterStore:
    """smol@1 (tags prod) and smol@2 (latest); wrong-base@1, a SmolLM2 LoRA whose manifest says it was
    trained on the tiny Llama; tampered@1, a byte of its weights flipped after publishing."""
    tmp = tmp_path_factory.mktemp("vllm-store")
    store = AdapterStore(tmp / "store")
    v1 = smol_lora(smollm2_dir, tmp / "smol-1", seed=0)
    store.publish(v1, "smol", tags=["prod"])
    store.publish(smol_lora(smollm2_dir, tmp / "smol-2", seed=1), "smol")

    manifest = read_manifest(v1)
    manifest["base_model"] = {
        "name": "tiny-llama",
        "path": str(tiny_llama_dir),
        "fingerprint": fingerprint_model(tiny_llama_dir),
    }
    write_manifest(v1, manifest)
    store.publish(v1, "wrong-base")

    weights = store.publish(tmp / "smol-2", "tampered").path / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    return store


@pytest.fixture(scope="module")
def reference(store, smollm2_dir) -> dict[str, list[dict]]:
    """adapterkit's engine answers (prompt ids, top-5 logprobs) for smol@1 and smol@2."""
    return {ref: engine_answers(smollm2_dir, store.root, ref, PROMPTS) for ref in ("smol@1", "smol@2")}


def test_parity_cli_passes_on_vllm_for_a_trained_adapter(tmp_path_factory, smollm2_dir, vllm_ready, tmp_path, capsys):
    """A LoRA trained by our loop (not random weights), on its own held-out rows: vLLM's logprobs equal the
    engine's within 1e-4 while the training moved them by far more than that."""
    store, ref = trained_smol_lora(tmp_path_factory, smollm2_dir)
    report = tmp_path / "parity.json"
    capsys.readouterr()
    code = parity_main([ref, "--runtime", "vllm", "--store", str(store.root), "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    got = json.loads(report.read_text())
    assert got["passed"] and len(got["rows"]) == 8 and got["max_diff"] <= TOL
    # The check has teeth: the trained adapter moves the base's top-5 logprobs by far more than the tolerance.
    assert got["effect"] > 100 * TOL, got["effect"]


def test_parity_passes_on_vllm_serving_a_merged_export(tmp_path_factory, smollm2_dir, vllm_ready, tmp_path, capsys):
    """`adapterkit export --to merged` of the trained adapter, served by vLLM as its model (no LoRA)."""
    store, ref = trained_smol_lora(tmp_path_factory, smollm2_dir)
    merged = tmp_path / "merged"
    assert export_main([ref, str(merged), "--to", "merged", "--store", str(store.root)]) == 0
    report = tmp_path / "parity.json"
    capsys.readouterr()
    args = [ref, "--runtime", "vllm", "--artifact", str(merged), "--store", str(store.root), "--json", str(report)]
    code = parity_main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    got = json.loads(report.read_text())
    assert got["passed"] and len(got["rows"]) == 8 and got["effect"] > 100 * TOL


@pytest.fixture(scope="module")
def server(store, smollm2_dir, vllm_ready, tmp_path_factory):
    """`scripts/serve.py --engine vllm` with smol@1 preloaded; the rest comes through the resolver."""
    port = free_port()
    argv = [
        sys.executable,
        str(REPO / "scripts" / "serve.py"),
        "--engine",
        "vllm",
        "--base",
        str(smollm2_dir),
        "--store",
        str(store.root),
        "--preload",
        "smol@1",
        "--port",
        str(port),
        "--capacity",
        "2",
        "--max-prompt-tokens",
        "448",
        "--max-tokens",
        "64",
    ]
    log = tmp_path_factory.mktemp("vllm-log") / "serve.log"
    with VLLMServer(argv, dict(os.environ), f"http://127.0.0.1:{port}", log_path=log) as url:
        yield url


def _complete(url: str, model: str, prompt_ids: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_serves_a_tagged_version_from_the_store(server, reference):
    ids = [a["prompt_ids"] for a in reference["smol@1"]]
    for ref in ("smol@prod", "smol@1"):  # resolved by the plugin / preloaded by serve.py
        got = completion_logprobs(server, ref, ids, 5)
        for want, top in zip(reference["smol@1"], got):
            assert max_prob_diff(want["top_logprobs"], top) <= TOL, (ref, want, top)
    models = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert {"smol@1", "smol@prod"} <= set(models)


def test_refuses_an_adapter_trained_on_another_base(server, reference):
    response = _complete(server, "wrong-base", reference["smol@1"][0]["prompt_ids"])
    assert response.status_code == 400
    assert "was trained on base tiny-llama" in response.json()["error"]["message"]


def test_refuses_a_tampered_adapter(server, reference):
    response = _complete(server, "tampered@1", reference["smol@1"][0]["prompt_ids"])
    assert response.status_code == 400
    assert "checksum mismatch" in response.json()["error"]["message"]


def test_unknown_references_and_paths_are_not_found(server, store, reference):
    for name in ("nope", "smol@prodd", "smol@9", str(store.root / "smol" / "1")):
        assert _complete(server, name, reference["smol@1"][0]["prompt_ids"]).status_code == 404, name


def test_a_moved_tag_is_served_after_an_unload(server, store, reference):
    ids = [a["prompt_ids"] for a in reference["smol@2"]]
    store.tag("smol@2", "prod")
    # vLLM keeps a resolved name: still version 1 until it is unloaded.
    before = completion_logprobs(server, "smol@prod", ids[:1], 5)[0]
    assert max_prob_diff(reference["smol@1"][0]["top_logprobs"], before) <= TOL
    unload = httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "smol@prod"}, timeout=60)
    assert unload.status_code == 200, unload.text
    for want, top in zip(reference["smol@2"], completion_logprobs(server, "smol@prod", ids, 5)):
        assert max_prob_diff(want["top_logprobs"], top) <= TOL
