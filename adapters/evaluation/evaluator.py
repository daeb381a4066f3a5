"""Held-out evaluation: loss + metrics for classifiers, loss + exact match of generations for causal LMs."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from transformers import LogitsProcessorList

from adapters.data.loading import eval_dataloader
from adapters.evaluation.metrics import classification_metrics, exact_match, save_confusion_matrix
from adapters.modeling.generation import mean_token_confidence
from adapters.modeling.losses import causal_lm_response_loss


@torch.no_grad()
def evaluate_classification(model, dataloader, accelerator, labels: list[str], out_dir=None) -> dict:
    """Mean loss over the rows and classification_metrics of the argmax predictions.

    dataloader yields dicts of [batch, ...] tensors with "labels" [batch] class ids; accelerator
    gives the device and is_main_process (only the main process writes the confusion matrix into
    out_dir, when given). Returns {"loss", "accuracy", "f1_macro", ...}; the model is left in train mode.
    """
    model.eval()
    losses, preds, refs = [], [], []
    for batch in dataloader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**batch)
        losses.append(out.loss.float().item() * len(batch["labels"]))
        preds += out.logits.argmax(-1).tolist()
        refs += batch["labels"].tolist()
    model.train()
    n = max(1, len(refs))
    metrics = {"loss": sum(losses) / n, **classification_metrics(preds, refs, labels)}
    if out_dir is not None and accelerator.is_main_process:
        save_confusion_matrix(preds, refs, labels, out_dir)
    return metrics


@torch.no_grad()
def evaluate_causal_lm(
    model,
    dataset,
    tokenizer,
    accelerator,
    batch_size: int,
    max_new_tokens: int,
    generate: bool = True,
    collect: dict | None = None,
) -> dict:
    """Mean response-token loss (and perplexity), and exact match of greedy generations.

    dataset: tokenized causal-LM rows with "prompt_ids" and "target"; batch_size in rows;
    max_new_tokens per generated answer. generate False skips generation (loss only).
    collect: a dict that receives the generated answers ("predictions") and their token
    confidences ("confidences"), e.g. for the drift reference.
    Returns {"loss" (nats per response token), "perplexity"} plus, with generate, "exact_match"
    and the first five {"target", "prediction"} "examples"; the model is left in train mode.
    """
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in eval_dataloader(dataset, "causal-lm", tokenizer, batch_size):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, _ = causal_lm_response_loss(model, batch, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((batch["labels"][:, 1:] != -100).sum())
    mean_loss = total_loss / max(1, total_tokens)
    metrics = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50))}
    if generate:
        predictions, confidences = generate_scored_answers(
            model, tokenizer, list(dataset["prompt_ids"]), accelerator.device, batch_size, max_new_tokens
        )
        if collect is not None:
            collect.update(predictions=predictions, confidences=confidences)
        metrics["exact_match"] = exact_match(predictions, list(dataset["target"]))
        metrics["examples"] = [{"target": t, "prediction": p} for t, p in list(zip(dataset["target"], predictions))[:5]]
    model.train()
    return metrics


def first_line_answer(text: str) -> str:
    """The answer in a generation: its first line, stripped (what exact match and drift labels compare)."""
    return text.split("\n")[0].strip()


@torch.no_grad()
def generate_scored_answers(
    model, tokenizer, prompts: list[list[int]], device, batch_size: int, max_new_tokens: int
) -> tuple[list[str], list[float | None]]:
    """Greedy generation, batched with left padding (sorted by length so batches pad little).

    Returns the first line of each generation and its confidence: the geometric mean of the
    model's probability of each generated token before the end token (as the server logs it).
    prompts: token ids per prompt; batch_size in prompts; max_new_tokens per answer.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    confidences: list[float | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = {t for t in (tokenizer.eos_token_id, pad) if t is not None}
    unwrapped = getattr(model, "module", model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        scorer = _ChosenTokenLogprobs()
        sequences = unwrapped.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([scorer]),
        )
        new = sequences[:, width:]
        chosen = scorer.finish(sequences).cpu()  # [rows, new tokens]
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            n = next((k for k, t in enumerate(tokens) if t in ends), len(tokens))
            results[i] = first_line_answer(tokenizer.decode(tokens, skip_special_tokens=True))
            confidences[i] = mean_token_confidence(float(chosen[row, :n].sum()), n)
    return results, confidences


class _ChosenTokenLogprobs:
    """A logits processor that keeps only the log-probability of each chosen token.

    Called with each step's scores; the token chosen from them shows up as the last input id
    of the next call (or of the final sequences), so memory stays one [rows, vocab] step
    instead of every step's logits.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, chosen.unsqueeze(-1)).squeeze(-1))
            self.previous = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] log-probabilities of the chosen tokens, given the final [rows, length] sequences."""
        self._take(sequences[:, -1])
        if not self.steps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float)
        return torch.stack(self.steps, dim=1)


def adapter_disabled(model):
    """Context in which a peft model runs as its bare base (for the before/after comparison)."""
    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "disable_adapter"):
        return unwrapped.disable_adapter()
    return nullcontext()
