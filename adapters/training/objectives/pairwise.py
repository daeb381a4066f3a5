"""DPO, ORPO and SimPO: losses on (chosen, rejected) pairs, and the objective that trains with them.

The formulas are TRL 1.16's, written out on sequence log-probabilities (tests/training/
test_objectives.py checks each against TRL's own code on the same log-probs):

- DPO (Rafailov et al. 2023), TRL ``DPOTrainer._compute_loss``: with the implicit reward margin
  delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) (sums over completion tokens),
  sigmoid: -log sigma(beta delta); hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta delta);
  ipo (Azar et al. 2023): (delta' - 1 / (2 beta))^2 on per-token means delta'.
- ORPO (Hong et al. 2024), TRL ``ORPOTrainer.odds_ratio_loss``: on per-token mean log-probs,
  log odds = (c - r) - (log(1 - e^c) - log(1 - e^r)); loss = NLL(y_w) - beta log sigma(log odds).
  The NLL is the chosen response's per-token mean, as in the paper; TRL averages it over the
  prompt tokens too.
- SimPO (Meng et al. 2024), TRL ``CPOTrainer.cpo_loss`` with loss_type "simpo" (and cpo_alpha 0):
  -log sigma(beta (c - r) - gamma) on per-token mean log-probs; no reference model.

The reference of DPO is the base with the adapter disabled (peft's ``disable_adapter()``): no
second copy of the model in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.config import PreferenceConfig
from adapters.evaluation.evaluator import adapter_disabled
from adapters.modeling.logprobs import completion_logps

#: beta when train.preference.beta is not set: TRL's defaults (SimPO: the paper's range starts at 2).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "simpo": 2.0}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO losses [pairs] from sequence log-probs [pairs] (nats, summed over completion tokens)
    of the policy and the reference. loss_type: "sigmoid", "hinge" or "ipo" (ipo needs the completion
    token counts [pairs]). Raises ValueError for another loss_type."""
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: sigmoid, hinge, ipo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012; as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair ORPO losses [pairs] from per-token mean log-probs [pairs]: the chosen response's NLL
    minus beta (the paper's lambda) times the log-sigmoid of the log odds ratio."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds)


def simpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """Per-pair SimPO losses [pairs] from per-token mean log-probs [pairs]: -log sigma(beta (c - r) - gamma)."""
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - gamma)


class PairwiseObjective:
    """dpo, orpo or simpo on batches of adapters.data.pairs.pair_collator (2B rows: B chosen, then B rejected).

    loss(model, batch) is the sum of the B per-pair losses; count(model, batch) is B, so the loop's
    normalization by the step's global count (adapters.training.step) gives the mean over all pairs
    of the optimizer step, as TRL's per-batch mean does for one batch.
    """

    def __init__(self, name: str, options: PreferenceConfig):
        self.name = name
        self.options = options
        self.beta = options.beta if options.beta is not None else DEFAULT_BETA[name]
        self.needs_reference = name == "dpo"
        self._stats: list[tuple[float, float, int]] = []  # (pairs ranked right, summed margin, pairs) per batch

    def count(self, model, batch: dict[str, torch.Tensor]) -> int:
        """The pairs in the batch (half its rows)."""
        return int(batch["input_ids"].shape[0]) // 2

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed per-pair loss of the batch (a scalar with gradient)."""
        logps, mask = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        sums, tokens = logps.sum(1), mask.sum(1).float()  # [2B] each
        pairs = sums.shape[0] // 2
        chosen, rejected = sums[:pairs], sums[pairs:]
        chosen_tokens, rejected_tokens = tokens[:pairs], tokens[pairs:]
        if self.name == "dpo":
            with torch.no_grad(), adapter_disabled(model):
                ref = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum(1)
            losses = dpo_loss(
                chosen,
                rejected,
                ref[:pairs],
                ref[pairs:],
                self.beta,
                self.options.loss_type,
                chosen_tokens,
                rejected_tokens,
            )
        else:
            chosen_mean = chosen / chosen_tokens.clamp(min=1.0)
            rejected_mean = rejected / rejected_tokens.clamp(min=1.0)
            if self.name == "orpo":
                losses = orpo_loss(chosen_mean, rejected_mean, self.beta)
            else:
                losses = simpo_loss(chosen_mean, rejected_mean, self.beta, self.options.simpo_gamma)
        margin = (chosen - rejected).detach()
        self._stats.append((float((margin > 0).sum()), float(margin.sum()), pairs))
        return losses.sum()

    def step_stats(self) -> dict[str, float]:
        """Since the last call, on this process: the share of training pairs whose chosen response has
        the higher log-prob, and the mean log-prob margin chosen - rejected (nats)."""
        if not self._stats:
            return {}
        right, margin, pairs = (sum(column) for column in zip(*self._stats))
        self._stats = []
        return {"train_preference_accuracy": right / pairs, "train_logp_margin": margin / pairs}

    def manifest_entry(self) -> dict:
        """What the adapter's manifest records about the objective."""
        entry = {
            "name": self.name,
            "beta": self.beta,
            "reference": "base with adapter disabled" if self.needs_reference else None,
        }
        if self.name == "dpo":
            entry["loss_type"] = self.options.loss_type
        if self.name == "simpo":
            entry["gamma"] = self.options.simpo_gamma
        return entry
