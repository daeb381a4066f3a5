"""lm-evaluation-harness through the server: its `local-completions` model (token-id prompts, echo + logprobs
for log-likelihoods, stop strings for generate-until) gives the results of its `hf` model with `peft=` on the
same tiny base and adapter. The tasks are the small local files in lm_eval_tasks/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapters.serving.engine import InferenceEngine
from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.settings import ServerSettings
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

TASKS = Path(__file__).parent / "lm_eval_tasks"
ATOL = 1e-4  # log-likelihoods: the server's batched LoRA against peft's forward, both float32


def task_config(name: str) -> dict:
    """The task YAML as a dict, its data file made absolute."""
    config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    files["test"] = str(TASKS / files["test"])
    return config


def evaluate(model: str, model_args: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task_config("tiny_choice"), task_config("tiny_until")],
        task_manager=TaskManager(include_defaults=False),  # no scan of lm-eval's thousands of task files
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def per_sample(results: dict, task: str) -> list:
    """Each document's filtered responses, in document order."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lm-eval-src") / "alpha", seed=51)


def test_local_completions_through_the_server_equals_hf_with_peft(tiny_llama_dir, adapter, tmp_path, one_torch_thread):
    store = AdapterStore(tmp_path / "store")
    store.publish(adapter, "alpha")
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)
    with BackgroundServer(create_app(engine, ServerSettings(max_tokens=32, batch_window_ms=2))) as server:
        served = evaluate(
            "local-completions",
            {
                "base_url": server.url + "/v1/completions",
                "model": "alpha",
                "tokenizer": str(tiny_llama_dir),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "batch_size": 4,
                "max_length": 200,
                "num_concurrent": 1,
                "max_retries": 1,
            },
        )
    local = evaluate(
        "hf",
        {"pretrained": str(tiny_llama_dir), "peft": str(adapter), "dtype": "float32", "device": "cpu", "batch_size": 4},
    )

    choice, until = "adapterkit_tiny_choice", "adapterkit_tiny_until"
    assert served["results"][choice]["acc,none"] == local["results"][choice]["acc,none"]
    served_ll, local_ll = per_sample(served, choice), per_sample(local, choice)
    assert len(served_ll) == 6
    for got, expected in zip(served_ll, local_ll):  # one (log-likelihood, is_greedy) per choice
        assert [g for _, g in got] == [g for _, g in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=ATOL)
    assert per_sample(served, until) == per_sample(local, until)
    assert any(r[0] for r in per_sample(served, until))  # something was generated
    assert served["results"][until]["exact_match,none"] == local["results"][until]["exact_match,none"]
