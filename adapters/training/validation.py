"""Evaluation inside a run: the validation split during training (timed, feeding early stopping)
and any split through the task's evaluator (adapters.evaluation.evaluator)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from adapters.config import RunConfig
from adapters.constants import GENERATION_METRICS
from adapters.data.loading import PreparedData, eval_dataloader
from adapters.data.pairs import PAIR_COLUMNS
from adapters.evaluation.evaluator import evaluate_causal_lm, evaluate_classification
from adapters.evaluation.preference import evaluate_preference
from adapters.training.checkpoint import trainable_state_dict
from adapters.training.state import EarlyStopping

if TYPE_CHECKING:  # setup imports this module: a run-time import would be circular
    from adapters.training.setup import TrainingRun


def evaluate_split(
    model,
    dataset,
    tokenizer,
    accelerator,
    cfg: RunConfig,
    prepared: PreparedData,
    generate: bool,
    out_dir=None,
    collect: dict | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on a tokenized split, gathered over all processes.

    Classification: loss, accuracy, macro-F1 (and a confusion matrix into out_dir when given).
    Causal LM: mean response-token loss and perplexity, plus exact match of greedy answers when
    `generate` (the slow part); `collect` receives the answers and their confidences. Preference rows
    add preference_accuracy and logp_margin (adapters.evaluation.preference).
    """
    if cfg.task == "sequence-classification":
        dl = eval_dataloader(dataset, cfg.task, tokenizer, cfg.train.eval_batch_size)
        return evaluate_classification(model, dl, accelerator, prepared.labels, out_dir=out_dir)
    metrics = evaluate_causal_lm(
        model,
        dataset,
        tokenizer,
        accelerator,
        cfg.train.eval_batch_size,
        cfg.eval.max_new_tokens,
        generate=generate,
        collect=collect,
    )
    if PAIR_COLUMNS[0] in dataset.column_names:
        metrics.update(evaluate_preference(model, dataset, tokenizer, accelerator, cfg.train.eval_batch_size))
    return metrics


def needs_generation(metric: str) -> bool:
    """Whether a watched validation metric needs generated answers (not just the loss)."""
    return metric.removeprefix("eval_") in GENERATION_METRICS


class Validator:
    """Evaluates the validation split and keeps the seconds spent doing it (`seconds`), which a
    train.max_seconds budget does not count. Generation runs only if `metric` needs it."""

    def __init__(self, run: TrainingRun, metric: str):
        self.run = run
        self.generate = needs_generation(metric)
        self.seconds = 0.0

    def __call__(self) -> dict[str, Any]:
        """The validation metrics, keys prefixed "eval_" (eval_loss, eval_accuracy, ...)."""
        run = self.run
        started = time.perf_counter()
        metrics = evaluate_split(
            run.model,
            run.tokenized["validation"],
            run.tokenizer,
            run.accelerator,
            run.cfg,
            run.prepared,
            generate=self.generate,
        )
        self.seconds += time.perf_counter() - started
        return {f"eval_{k}": v for k, v in metrics.items()}

    def check(self, step: int, stopper: EarlyStopping) -> bool:
        """Evaluate at optimizer step `step`, log the metrics, update `stopper` (keeping a copy of
        the trainable weights on improvement); returns whether training should stop."""
        run = self.run
        metrics = self()
        run.metrics_log.write(step, metrics)
        stopper.update(metrics, step, lambda: trainable_state_dict(run.accelerator.unwrap_model(run.model)))
        return stopper.should_stop
