"""The same rows give the same adapter and the same logged losses whatever the batch split.

Each optimizer step's loss is its global batch's summed cross-entropy divided by the number of
targets in that whole batch (response tokens for causal-lm, rows for classification;
adapters.training.step). Per-micro-batch means, as before, weighed a micro-batch of one-word
answers as much as one of 25-word answers: `batch 4 x accum 2` then saved an adapter 26% away
from `batch 8 x accum 1` on the same rows. Here batch 8 x 1 = 4 x 2 = 2 x 4, for LoRA and
prompt tuning on causal-lm (answers of 1 or ~25 words) and for a classifier with label smoothing
whose last optimizer step has an uneven last micro-batch (and, at 2 x 4, a short window).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPLITS = ((8, 1), (4, 2), (2, 4))  # (batch_size, grad_accum): the same 8 rows per optimizer step
STEPS = 3
LONG_ANSWER = (
    "the answer is a long and careful explanation that keeps going for many words so that "
    "this response holds about twenty five words in all"
)


def qa_rows(n: int = 48) -> list[dict]:
    """Distinct questions; every third answer is one word, the others about 25 words."""
    return [
        {
            "text": f"Question {i}: what colour is item number {i} in the list?",
            "label": "green" if i % 3 == 0 else f"{LONG_ANSWER} for item {i}",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def causal_lm_config(model_dir: Path, data: Path, run_dir: Path, batch: int, accum: int, method: dict) -> dict:
    return {
        "task": "causal-lm",
        "model": {"name": str(model_dir)},
        "data": {
            "name": str(data),
            "max_length": 128,
            "max_train_samples": 8 * STEPS,
            "max_eval_samples": 4,
            "max_test_samples": 4,
        },
        "method": method,
        "train": {
            "lr": 5e-3,
            "batch_size": batch,
            "grad_accum": accum,
            "max_steps": STEPS,
            "log_every": 1,
            "seed": 1,
            "eval_batch_size": 8,
            "group_by_length": False,
        },
        "eval": {"baseline": False, "max_new_tokens": 2},
        "output": {"run_dir": str(run_dir), "name": "norm"},
    }


def classification_config(model_dir: Path, run_dir: Path, batch: int, accum: int) -> dict:
    # 22 rows: steps of 8, 8 and 6 rows; at 4 x 2 the last micro-batch holds 2 rows, at 2 x 4 the last window 3.
    return {
        "task": "sequence-classification",
        "model": {"name": str(model_dir), "dropout": 0.0},  # BERT's own dropout would draw per batch shape
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 22,
            "max_eval_samples": 8,
            "max_test_samples": 8,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "lr": 5e-3,
            "batch_size": batch,
            "grad_accum": accum,
            "max_steps": STEPS,
            "log_every": 1,
            "seed": 1,
            "eval_batch_size": 16,
            "group_by_length": False,
            "label_smoothing": 0.1,
        },
        "eval": {"baseline": False},
        "output": {"run_dir": str(run_dir), "name": "norm-cls"},
    }


def train_run(raw: dict) -> Path:
    from adapters.config import load_config
    from adapters.training.loop import train

    return train(load_config(raw=raw)).run_dir


def logged(run: Path, key: str = "loss") -> list[float]:
    """`key` ("loss", "grad_norm") of each step's log line."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"{run.name}: loss logged at steps {steps}"
    return [r[key] for r in rows if "loss" in r]


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_training(run: Path, reference: Path, rel: float = 1e-5, loss_tol: float = 1e-5) -> None:
    """Logged losses within `loss_tol`; gradient norms and every saved tensor within `rel` of the
    reference (relative L2). Adam's update hardly changes when all gradients are scaled by the same
    factor: the gradient norm is what shows a wrong normalization of the whole step."""
    assert logged(run) == pytest.approx(logged(reference), abs=loss_tol, rel=0), run.name
    assert logged(run, "grad_norm") == pytest.approx(logged(reference, "grad_norm"), rel=rel), run.name
    got, want = adapter_weights(run), adapter_weights(reference)
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        distance = (got[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-12)
        assert distance <= rel, f"{run.name}: {name} is {distance:.2e} (relative) away from {reference.name}"


def train_splits(make_raw, work: Path) -> dict[tuple[int, int], Path]:
    return {(b, a): train_run(make_raw(work / f"b{b}-a{a}", b, a)) for b, a in SPLITS}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loss-normalization")


@pytest.fixture(scope="module")
def qa_data(work) -> Path:
    return write_jsonl(work / "qa.jsonl", qa_rows())


def test_causal_lm_lora_is_independent_of_the_batch_split(work, qa_data, tiny_llama_dir):
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    runs = train_splits(lambda run, b, a: causal_lm_config(tiny_llama_dir, qa_data, run, b, a, method), work / "lora")
    for split in SPLITS[1:]:
        assert_same_training(runs[split], runs[(8, 1)])


def test_causal_lm_prompt_tuning_is_independent_of_the_batch_split(work, qa_data, tiny_llama_dir):
    method = {"name": "prompt-tuning", "num_virtual_tokens": 4}
    runs = train_splits(lambda run, b, a: causal_lm_config(tiny_llama_dir, qa_data, run, b, a, method), work / "pt")
    for split in SPLITS[1:]:
        assert_same_training(runs[split], runs[(8, 1)])


def test_classification_with_label_smoothing_is_independent_of_the_batch_split(work, tiny_bert_dir):
    runs = train_splits(lambda run, b, a: classification_config(tiny_bert_dir, run, b, a), work / "cls")
    for split in SPLITS[1:]:
        assert_same_training(runs[split], runs[(8, 1)])


# ---------------------------------------------------------------- the pieces
def test_logged_loss_is_the_global_batch_token_weighted_mean(work, qa_data, tiny_llama_dir):
    """Step 1's logged loss = summed response cross-entropy of its 8 rows / their target tokens,
    recomputed here on the rows the sampler drew, by the base model (LoRA starts as the identity)."""
    from transformers import AutoModelForCausalLM

    from adapters.config import load_config
    from adapters.data.loading import collator_for, prepare_splits, tokenize_splits
    from adapters.modeling.backbone import load_tokenizer
    from adapters.modeling.losses import causal_lm_response_loss, response_target_count

    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    raw = causal_lm_config(tiny_llama_dir, qa_data, work / "by-hand", 2, 4, method)
    run = train_run(raw)
    cfg = load_config(raw=raw)
    tokenizer = load_tokenizer(cfg.model)
    train_rows = tokenize_splits(prepare_splits(cfg), cfg, tokenizer)["train"]
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()[:8]
    batch = collator_for("causal-lm", tokenizer)([train_rows[i] for i in order])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        summed = causal_lm_response_loss(model, batch, reduction="sum")[0].item()
    counts = [response_target_count(model, batch["labels"][i : i + 1]) for i in range(8)]
    assert min(counts) < 5 < 20 < max(counts), counts  # the rows really differ in length
    assert logged(run)[0] == pytest.approx(summed / sum(counts), abs=1e-5)


def test_prompt_tuning_summed_loss_counts_the_first_label_after_the_virtual_tokens(tiny_llama_dir):
    """peft prepends V virtual tokens with labels -100: the last one predicts the row's first token.
    Left-padded or not, a row's summed loss and count are those of the row alone."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.modeling.losses import causal_lm_response_loss, response_target_count

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
    ).eval()
    ids = torch.randint(5, 500, (2, 6))
    labels = ids.clone()
    labels[1, :4] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        summed, _ = causal_lm_response_loss(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, reduction="sum"
        )
        # Row 1 alone, then behind 3 columns of left padding in a batch with a longer row.
        row = {"input_ids": ids[1:], "attention_mask": torch.ones_like(ids[1:]), "labels": labels[1:]}
        alone = causal_lm_response_loss(model, row, reduction="sum")[0]
        padded = {
            "input_ids": torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids[1:]], 1),
            "attention_mask": torch.cat([torch.zeros(1, 3, dtype=ids.dtype), torch.ones_like(ids[1:])], 1),
            "labels": torch.cat([torch.full((1, 3), -100), labels[1:]], 1),
        }
        in_padding = causal_lm_response_loss(model, padded, reduction="sum")[0]
    assert response_target_count(model, labels) == 6 + 2  # not (6 - 1) + 2: column 0 is predicted too
    assert summed.item() == pytest.approx(out.loss.item() * 8, rel=1e-5)  # peft's own mean, times the count
    assert in_padding.item() == pytest.approx(alone.item(), rel=1e-5)


def test_backward_factor_undoes_the_launchers_averaging():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from adapters.training.step import backward_factor

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, gradient_accumulation_steps=4)
    zero = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, gradient_accumulation_steps=4)
    assert backward_factor(ddp) == (8.0, {})
    assert backward_factor(zero) == (2.0, {"scale_wrt_gas": False})


def test_accumulation_windows_group_micro_batches_per_optimizer_step():
    from adapters.training.step import accumulation_windows

    assert [len(w) for w in accumulation_windows(iter(range(7)), 3)] == [3, 3, 1]
    assert list(accumulation_windows([], 2)) == []
