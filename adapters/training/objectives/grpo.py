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

Unlike TRL, each prompt runs through the model once per group, not once per completion: its
key/value cache is repeated for the group's samples, both to sample and to score them
(shared_prompt_logps; the same log-probs and gradients as the full rows, tested). GRPO prompts are
long and its completions short, so this divides the step's cost by about num_generations.
Prompt-learning methods (virtual tokens in place of a cache) take the full rows and generate.
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


def _prompt_learning(model) -> bool:
    """Whether the (possibly DDP-wrapped) model's active peft adapter is prompt tuning / prefix / P-tuning,
    whose virtual tokens rule out a shared prompt cache."""
    config = getattr(getattr(model, "module", model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _prompt_cache(model, prompts: list[list[int]], group: int, pad: int):
    """Run the B prompts (left-padded) once and repeat their key/value cache for `group` completions each.

    Returns (cache or None when the model keeps none, e.g. under gradient checkpointing; the logits
    [B x group, vocab] predicting each completion's first token; the prompt attention mask
    [B x group, P]; the prompts' lengths [B x group])."""
    device = next(getattr(model, "module", model).parameters()).device
    mask = pad_rows([[1] * len(p) for p in prompts], 0, "left").to(device)  # [B, P]
    out = model(
        input_ids=pad_rows(prompts, pad, "left").to(device),
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # left padding: count from the first token
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "past_key_values", None)
    if cache is not None:
        cache.batch_repeat_interleave(group)
    first = out.logits[:, -1].repeat_interleave(group, dim=0)
    return cache, first, mask.repeat_interleave(group, dim=0), mask.sum(1).repeat_interleave(group)


def shared_prompt_logps(
    model, prompts: list[list[int]], completions: list[list[int]], group: int, pad: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """completion_logps of the rows prompt + completion (prompt-major: completions[i * group + j] follows
    prompts[i]), with each prompt run once for its group instead of once per completion: its key/value
    cache is repeated for the group's completions (the same numbers; tests compare). GRPO's prompts are
    much longer than its completions, so this divides the forward and backward cost by about `group`.

    Returns (logps, mask), both [B x group, K] (K: the longest completion; logps in nats at
    `temperature`, 0 where mask is False), or None when the model keeps no cache (then use
    completion_logps)."""
    cache, first, prompt_mask, lengths = _prompt_cache(model, prompts, group, pad)
    if cache is None:
        return None
    device = prompt_mask.device
    targets = pad_rows(completions, pad, "right").to(device)  # [B x group, K]
    mask = pad_rows([[1] * len(c) for c in completions], 0, "right").to(device).bool()
    logits = first.unsqueeze(1)  # [B x group, 1, vocab]
    width = targets.shape[1]
    if width > 1:  # completion tokens but the last predict the next ones, after the cached prompt
        out = model(
            input_ids=targets[:, :-1],
            attention_mask=torch.cat([prompt_mask, mask[:, :-1].long()], dim=1),
            position_ids=lengths.unsqueeze(1) + torch.arange(width - 1, device=device),
            past_key_values=cache,
            use_cache=True,
        )
        logits = torch.cat([logits, out.logits], dim=1)  # [B x group, K, vocab]
    logits = logits.float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


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
        end token (kept: the model learns to stop); the model samples in eval mode (no dropout), at
        train.grpo.temperature and top_p (generate's sampling: temperature, then nucleus), each
        prompt run once for its group (its key/value cache repeated), or through generate for
        prompt-learning methods, whose virtual tokens take the cache's place."""
        unwrapped = getattr(model, "module", model)
        group = self.options.num_generations
        ends = eos_ids(unwrapped, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(ends)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            cache = None
            if not _prompt_learning(unwrapped):
                cache, logits, mask, lengths = _prompt_cache(unwrapped, prompts, group, pad)
            if cache is None:
                rows = self._generate(unwrapped, [p for p in prompts for _ in range(group)], ends, pad)
            else:
                rows = self._sample_cached(unwrapped, cache, logits, mask, lengths, ends, pad)
        finally:
            unwrapped.train(was_training)
        completions = []
        for row in rows:
            stop = next((i for i, token in enumerate(row) if token in ends), None)
            completions.append(row if stop is None else row[: stop + 1])
        return completions

    def _sample_cached(self, model, cache, logits, mask, lengths, ends: set[int], pad: int) -> list[list[int]]:
        """[rows] sampled token ids (max_new_tokens, pad after an end token) continuing a prompt cache
        whose next-token logits [rows, vocab], attention mask [rows, P] and lengths [rows] are given."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.options.temperature)])
        if self.options.top_p < 1:
            warpers.append(TopPLogitsWarper(self.options.top_p))
        end_ids = torch.tensor(sorted(ends), device=mask.device)
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        tokens = []
        for step in range(self.options.max_new_tokens):
            scores = warpers(None, logits.float())
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            done |= torch.isin(token, end_ids)
            if done.all() or step == self.options.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=(lengths + step).unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
        return torch.stack(tokens, dim=1).tolist()

    def _generate(self, model, repeated: list[list[int]], ends: set[int], pad: int) -> list[list[int]]:
        """[rows] sampled token ids after each of the `repeated` prompts, through model.generate."""
        out = model.generate(
            input_ids=pad_rows(repeated, pad, "left").to(next(model.parameters()).device),
            attention_mask=pad_rows([[1] * len(p) for p in repeated], 0, "left").to(next(model.parameters()).device),
            do_sample=True,
            temperature=self.options.temperature,
            top_p=self.options.top_p,
            top_k=0,
            max_new_tokens=self.options.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=sorted(ends),
        )
        return out[:, max(len(p) for p in repeated) :].tolist()

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
        logps, mask = self._logps(model, prompts, completions, rows)
        ref_logps = None
        if self.options.beta:
            with torch.no_grad(), adapter_disabled(model):
                ref_logps = self._logps(model, prompts, completions, rows)[0]
        losses = grpo_sequence_losses(logps, mask, advantages.to(device), ref_logps, self.options.beta)
        stats = {"reward": float(torch.nanmean(rewards)), "completion_tokens": float(mask.sum(1).float().mean())}
        stats.update({f"reward_{n}": float(torch.nanmean(per_function[:, i])) for i, n in enumerate(self.names)})
        self._stats.append(stats)
        return losses.sum()

    def _logps(self, model, prompts, completions, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and mask [completions, K] of the sampled completions: each prompt run once
        for its group (shared_prompt_logps) where the model allows, else on the full rows."""
        temperature = self.options.temperature
        if not _prompt_learning(model):
            pad = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
            shared = shared_prompt_logps(model, prompts, completions, self.options.num_generations, pad, temperature)
            if shared is not None:
                return shared
        return completion_logps(model, rows["input_ids"], rows["attention_mask"], rows["labels"], temperature)

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
