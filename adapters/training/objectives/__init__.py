"""Training objectives beyond supervised fine-tuning (``train.objective``): dpo, orpo, simpo
(pairwise), kto, and grpo, on any method of the registry.

They run inside adapterkit's own Accelerate loop, with TRL 1.16's formulas written out on our
batches (see docs/training.md, "Preference and RL objectives", for why not TRL's trainers). An
objective gives the loop two things per micro-batch (adapters.training.step): ``loss(model, batch)``,
the loss summed over the batch's items (pairs, completions), and ``count(model, batch)``, the
number of items, so the loop divides by the optimizer step's global item count as it does for
response tokens. ``step_stats()`` returns what it measured since the last step (preference
accuracy, rewards) for metrics.jsonl, ``manifest_entry()`` what the adapter's manifest records.
"""

from __future__ import annotations

from typing import Any

from adapters.config import PREFERENCE_OBJECTIVES, RunConfig
from adapters.data.pairs import pair_collator
from adapters.errors import ConfigError
from adapters.methods.weights_delta import DeltaMethod
from adapters.training.objectives.grpo import GRPOObjective, prompt_collator
from adapters.training.objectives.kto import KTOObjective
from adapters.training.objectives.pairwise import PairwiseObjective
from adapters.training.objectives.rewards import load_reward
from adapters.training.state import EarlyStopping


def build_objective(cfg: RunConfig, tokenizer, method, accelerator) -> tuple[Any, Any] | tuple[None, None]:
    """(objective, the train loader's collate function) for cfg.train.objective, or (None, None) for sft.

    Raises ConfigError when the objective needs a reference model (dpo, kto, grpo with beta > 0) and
    `method` trains the base's own weights (no adapter to disable), or a reward cannot be loaded.
    """
    name = cfg.train.objective
    if name == "sft":
        return None, None
    if name in PREFERENCE_OBJECTIVES:
        objective = (
            KTOObjective(cfg.train.preference, accelerator)
            if name == "kto"
            else PairwiseObjective(name, cfg.train.preference)
        )
        collate = pair_collator(tokenizer, kto=name == "kto")
    else:
        grpo = cfg.train.grpo
        rewards = [load_reward(spec, grpo.max_new_tokens) for spec in grpo.rewards]
        objective, collate = GRPOObjective(grpo, tokenizer, rewards), prompt_collator(tokenizer)
    if objective.needs_reference and isinstance(method, DeltaMethod):
        raise ConfigError(
            f"train.objective {name!r} compares with the base with the adapter disabled, but method "
            f"{method.name!r} trains the base's own weights; use an adapter method (e.g. lora)"
            + (", or train.grpo.beta: 0" if name == "grpo" else "")
        )
    return objective, collate


def objective_entry(objective) -> dict[str, Any]:
    """The manifest's ``objective``: {"name": "sft", "reference": None} for supervised runs, else the
    objective's own entry (name, reference, beta, rewards...)."""
    return {"name": "sft", "reference": None} if objective is None else objective.manifest_entry()


def default_stopper(cfg: RunConfig) -> EarlyStopping:
    """train.early_stopping, else what the run keeps the best weights of: the lowest eval_loss (sft),
    the highest eval_preference_accuracy (preference objectives), the highest eval_exact_match (grpo:
    its eval generates answers; the response loss of a reference answer is not what GRPO optimizes)."""
    if cfg.train.early_stopping is not None or cfg.train.objective == "sft":
        return EarlyStopping.from_config(cfg.train.early_stopping)
    if cfg.train.objective in PREFERENCE_OBJECTIVES:
        return EarlyStopping(metric="eval_preference_accuracy", mode="max")
    return EarlyStopping(metric="eval_exact_match", mode="max")
