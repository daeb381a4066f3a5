"""KTO (Ethayarajh et al. 2024): each completion judged on its own, desirable or undesirable, against
a reference point that estimates KL(policy || reference) from mismatched prompt/completion pairs.

Preference pairs are unpaired (TRL's ``unpair_preference_dataset``): the chosen completions are the
desirable ones, the rejected the undesirable ones. The formula is TRL 1.16's
``KTOTrainer._compute_loss`` (loss_type "kto"; tests/training/test_objectives.py checks it against
TRL's code): with r = log pi(y|x) - log ref(y|x) (sums over completion tokens) and
z = max(0, mean over the mismatched rows of log pi - log ref), detached and averaged over processes,

    desirable:   w_d (1 - sigma(beta (r - z)))        undesirable:   w_u (1 - sigma(beta (z - r)))

The reference is the base with the adapter disabled.
"""

from __future__ import annotations

import torch

from adapters.config import PreferenceConfig
from adapters.evaluation.evaluator import adapter_disabled
from adapters.modeling.logprobs import completion_logps
from adapters.training.objectives.pairwise import DEFAULT_BETA


def kto_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """[desirable + undesirable] KTO losses from log-ratios log pi - log ref [desirable] and
    [undesirable] (nats) and the reference point `kl` (a scalar, no gradient)."""
    chosen = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    return torch.cat((desirable_weight * chosen, undesirable_weight * rejected), 0)


def _sequence_logps(model, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """[rows] completion log-probs of the batch's rows (or of its `prefix`ed ones, e.g. "kl_")."""
    logps, _ = completion_logps(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"]
    )
    return logps.sum(1)


class KTOObjective:
    """kto on batches of adapters.data.pairs.pair_collator(kto=True): 2B completions (B desirable,
    B undesirable) plus 2B mismatched rows. loss(model, batch) sums the 2B per-completion losses and
    count(model, batch) is 2B (TRL averages over the completions of a batch).

    accelerator: averages the KL estimate over processes (TRL gathers it the same way).
    """

    def __init__(self, options: PreferenceConfig, accelerator):
        self.name = "kto"
        self.options = options
        self.beta = options.beta if options.beta is not None else DEFAULT_BETA["kto"]
        self.accelerator = accelerator
        self.needs_reference = True
        self._stats: list[tuple[float, float, int]] = []

    def count(self, model, batch: dict[str, torch.Tensor]) -> int:
        """The completions in the batch (its rows)."""
        return int(batch["input_ids"].shape[0])

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed per-completion KTO loss of the batch (a scalar with gradient)."""
        with torch.no_grad():
            kl_policy = _sequence_logps(model, batch, "kl_")
            with adapter_disabled(model):
                kl_ref = _sequence_logps(model, batch, "kl_")
                ref = _sequence_logps(model, batch)
        kl = (kl_policy - kl_ref).mean()
        if self.accelerator.num_processes > 1:
            kl = self.accelerator.reduce(kl, reduction="mean")
        kl = kl.clamp(min=0)
        logps = _sequence_logps(model, batch)
        half = logps.shape[0] // 2
        ratios = logps - ref
        losses = kto_losses(
            ratios[:half], ratios[half:], kl, self.beta, self.options.desirable_weight, self.options.undesirable_weight
        )
        margin = (logps[:half] - logps[half:]).detach()
        self._stats.append((float((margin > 0).sum()), float(kl), half))
        return losses.sum()

    def step_stats(self) -> dict[str, float]:
        """Since the last call, on this process: the share of training pairs whose chosen response has
        the higher log-prob, and the mean KL estimate (nats) of the reference point."""
        if not self._stats:
            return {}
        right = sum(s[0] for s in self._stats)
        pairs = sum(s[2] for s in self._stats)
        kl = sum(s[1] for s in self._stats) / len(self._stats)
        self._stats = []
        return {"train_preference_accuracy": right / max(pairs, 1), "kl": kl}

    def manifest_entry(self) -> dict:
        """What the adapter's manifest records about the objective."""
        return {
            "name": "kto",
            "beta": self.beta,
            "reference": "base with adapter disabled",
            "desirable_weight": self.options.desirable_weight,
            "undesirable_weight": self.options.undesirable_weight,
        }
