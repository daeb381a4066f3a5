"""GRPO (Shao et al. 2024, DeepSeekMath): sample a group of completions per prompt, score them with
verifiable rewards, and push up the log-probability of those that beat their group's mean.

As TRL 1.16's GRPOTrainer (tests/training/test_objectives.py checks both parts against TRL's code):

- advantages (``_generate_and_score_completions``, multi_objective_aggregation "sum_then_normalize"):
  the weighted sum r of the rewards (NaN for a completion no function scored), A = r - mean of its
  group, divided by the group's standard deviation (Bessel-corrected) + 1e-4 under scale_rewards
  "group"; unscored completions get A = 0;
- loss (``_compute_loss``, loss_type "grpo", num_iterations 1): per token -(pi / pi_detached) A
  (+ beta times the k3 estimate exp(ref - logp) - (ref - logp) - 1 of the KL to the reference),
  averaged over each completion's tokens; log-probs at the sampling temperature. Each batch of
  samples gets one gradient step, so the importance ratio is exactly 1 and PPO's clip cannot bind:
  TRL's min(ratio A, clip(ratio) A) has this value and this gradient.

A batch of B prompts trains on B x num_generations completions; each counts once in the loop's
normalization (count), as TRL averages over completions. The reference (beta > 0) is the base with
the adapter disabled.
"""

from __future__ import annotations

import torch

from adapters.config import GRPOConfig
from adapters.data.pairs import pad_rows, padding_side, rows_batch
from adapters.evaluation.evaluator import adapter_disabled
from adapters.modeling.generation import eos_ids
from adapters.modeling.logprobs import completion_logps
from adapters.training.objectives.rewards import RewardFn, score_completions


def nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Bessel-corrected standard deviation along `dim`, ignoring NaN (NaN with fewer than 2 values); TRL's nanstd."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    return torch.where(count > 1, variance, torch.full_like(variance, float("nan"))).sqrt()


def group_advantages(rewards: torch.Tensor, group: int, scale_rewards: str = "group") -> torch.Tensor:
    """[n] advantages of n = prompts x `group` rewards (prompt-major, NaN = unscored): reward minus
    its group's mean, over the group's std + 1e-4 when scale_rewards is "group" ("none": not scaled)."""
    grouped = rewards.view(-1, group)  # [prompts, group]
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1) + 1e-4)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def grpo_sequence_losses(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """[completions] GRPO losses from per-token log-probs and mask [completions, K] (adapters.modeling.
    logprobs.completion_logps), advantages [completions], and the reference's log-probs [completions, K]
    when beta > 0: the per-token loss averaged over each completion's tokens."""
    per_token = -torch.exp(logps - logps.detach()) * advantages.unsqueeze(1)
    if beta:
        diff = ref_logps - logps
        per_token = per_token + beta * (torch.exp(diff) - diff - 1)
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def prompt_collator(tokenizer):
    """causal-lm rows -> {"prompt_ids": [B lists of ids], "target": [B strings], "input_ids" /
    "attention_mask": the prompts padded [B, longest]} (the padded prompts count tokens and rows)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows):
        prompts = [list(r["prompt_ids"]) for r in rows]
        return {
            "prompt_ids": prompts,
            "target": [r["target"] for r in rows],
            "input_ids": pad_rows(prompts, pad, "left"),
            "attention_mask": pad_rows([[1] * len(p) for p in prompts], 0, "left"),
        }

    return collate


class GRPOObjective:
    """grpo on batches of prompt_collator. rewards: the reward functions (adapters.training.objectives.
    rewards.load_reward), `names` and `weights` their config names and weights."""

    def __init__(self, options: GRPOConfig, tokenizer, rewards: list[RewardFn]):
        self.name = "grpo"
        self.options = options
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.names = [r.name for r in options.rewards]
        self.weights = torch.tensor([r.weight for r in options.rewards], dtype=torch.float32)
        self.needs_reference = options.beta > 0
        self._stats: list[dict[str, float]] = []

    def count(self, model, batch) -> int:
        """The completions the batch trains on: prompts x num_generations."""
        return len(batch["prompt_ids"]) * self.options.num_generations

    @torch.no_grad()
    def sample(self, model, prompts: list[list[int]]) -> list[list[int]]:
        """num_generations sampled completions per prompt (prompt-major), each cut after its first
        end token (kept: the model learns to stop); the model samples in eval mode (no dropout)."""
        unwrapped = getattr(model, "module", model)
        group = self.options.num_generations
        repeated = [p for p in prompts for _ in range(group)]
        ends = eos_ids(unwrapped, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(ends)
        device = next(unwrapped.parameters()).device
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            out = unwrapped.generate(
                input_ids=pad_rows(repeated, pad, "left").to(device),
                attention_mask=pad_rows([[1] * len(p) for p in repeated], 0, "left").to(device),
                do_sample=True,
                temperature=self.options.temperature,
                top_p=self.options.top_p,
                top_k=0,
                max_new_tokens=self.options.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(ends),
            )
        finally:
            unwrapped.train(was_training)
        width = max(len(p) for p in repeated)
        completions = []
        for row in out[:, width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in ends), None)
            completions.append(row if stop is None else row[: stop + 1])
        return completions

    def loss(self, model, batch) -> torch.Tensor:
        """Sample, score, and return the summed GRPO loss of the batch's completions (a scalar with gradient)."""
        group, tok = self.options.num_generations, self.tokenizer
        prompts = batch["prompt_ids"]
        completions = self.sample(model, prompts)
        repeated = [p for p in prompts for _ in range(group)]
        per_function = score_completions(
            self.rewards,
            self.names,
            [tok.decode(p, skip_special_tokens=True) for p in repeated],
            [tok.decode(c, skip_special_tokens=True) for c in completions],
            completions,
            [t for t in batch["target"] for _ in range(group)],
        )  # [completions, functions]
        rewards = (per_function * self.weights).nansum(1)
        rewards[torch.isnan(per_function).all(1)] = float("nan")
        advantages = group_advantages(rewards, group, self.options.scale_rewards)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = rows_batch(
            [p + c for p, c in zip(repeated, completions)],
            [[-100] * len(p) + c for p, c in zip(repeated, completions)],
            pad,
            padding_side(),
        )
        device = batch["input_ids"].device
        rows = {k: v.to(device) for k, v in rows.items()}
        temperature = self.options.temperature
        logps, mask = completion_logps(model, rows["input_ids"], rows["attention_mask"], rows["labels"], temperature)
        ref_logps = None
        if self.options.beta:
            with torch.no_grad(), adapter_disabled(model):
                ref_logps = completion_logps(
                    model, rows["input_ids"], rows["attention_mask"], rows["labels"], temperature
                )[0]
        losses = grpo_sequence_losses(logps, mask, advantages.to(device), ref_logps, self.options.beta)
        stats = {"reward": float(torch.nanmean(rewards)), "completion_tokens": float(mask.sum(1).float().mean())}
        stats.update({f"reward_{n}": float(torch.nanmean(per_function[:, i])) for i, n in enumerate(self.names)})
        self._stats.append(stats)
        return losses.sum()

    def step_stats(self) -> dict[str, float]:
        """Since the last call, on this process: the mean reward (weighted sum, and per function) and
        the mean completion length in tokens."""
        if not self._stats:
            return {}
        keys = self._stats[0].keys()
        stats = {k: sum(s[k] for s in self._stats) / len(self._stats) for k in keys}
        self._stats = []
        return stats

    def manifest_entry(self) -> dict:
        """What the adapter's manifest records about the objective (rewards with their weights)."""
        o = self.options
        return {
            "name": "grpo",
            "reference": "base with adapter disabled" if self.needs_reference else None,
            "beta": o.beta,
            "num_generations": o.num_generations,
            "max_new_tokens": o.max_new_tokens,
            "temperature": o.temperature,
            "top_p": o.top_p,
            "scale_rewards": o.scale_rewards,
            "rewards": [r.model_dump(exclude_none=True) for r in o.rewards],
        }
