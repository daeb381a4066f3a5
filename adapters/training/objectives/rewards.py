"""Verifiable rewards for GRPO: functions that score sampled completions without a learned reward model.

A reward function follows TRL's convention (GRPOTrainer's ``reward_funcs``): it is called with
keyword arguments ``prompts`` (list[str], the rendered prompts), ``completions`` (list[str], the
decoded samples), ``completion_ids`` (list[list[int]]) and ``target`` (list[str], the row's target:
data.response_field or data.label_field after data.label_names), and returns one float per
completion (None: unscored; GRPO then gives it no advantage, as TRL does). By name:

- ``exact_match``: 1.0 when the completion's first line equals the target after normalize_answer
  (the comparison the exact-match metric makes), else 0.0;
- ``regex``: 1.0 when ``pattern`` is found in the completion (re.search), else 0.0;
- ``length_penalty``: -(completion tokens) / train.grpo.max_new_tokens, in [-1, 0].

Any other name is "module:function", imported when the run starts.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import torch

from adapters.config import RewardConfig
from adapters.errors import ConfigError
from adapters.evaluation.evaluator import first_line_answer
from adapters.evaluation.metrics import normalize_answer

RewardFn = Callable[..., list[float | None]]


def exact_match_reward(completions: list[str], target: list[str], **_: Any) -> list[float]:
    """1.0 where the completion's first line equals its target after normalize_answer, else 0.0."""
    return [float(normalize_answer(first_line_answer(c)) == normalize_answer(t)) for c, t in zip(completions, target)]


def regex_reward(pattern: str) -> RewardFn:
    """A reward of 1.0 for completions in which `pattern` is found (re.search), 0.0 for the others."""
    compiled = re.compile(pattern)

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return reward


def length_penalty_reward(max_new_tokens: int) -> RewardFn:
    """A reward of -(completion tokens) / max_new_tokens: 0 for an empty completion, -1 for one that used the budget."""

    def reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [-len(ids) / max_new_tokens for ids in completion_ids]

    return reward


def load_reward(spec: RewardConfig, max_new_tokens: int) -> RewardFn:
    """The reward function of one ``train.grpo.rewards`` entry.

    Raises ConfigError when a "module:function" cannot be imported or is not callable.
    """
    if spec.name == "exact_match":
        return exact_match_reward
    if spec.name == "regex":
        return regex_reward(spec.pattern)
    if spec.name == "length_penalty":
        return length_penalty_reward(max_new_tokens)
    module_name, _, attr = spec.name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"train.grpo.rewards: cannot import {spec.name!r} ({type(err).__name__}: {err})") from None
    if not callable(fn):
        raise ConfigError(f"train.grpo.rewards: {spec.name!r} is not callable")
    return fn


def score_completions(
    functions: list[RewardFn],
    names: list[str],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    target: list[str],
) -> torch.Tensor:
    """[completions, functions] float rewards (NaN where a function returned None).

    Raises ConfigError when a function returns a number of rewards other than one per completion.
    """
    columns = []
    for fn, name in zip(functions, names):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, target=target)
        if len(values) != len(completions):
            raise ConfigError(f"reward {name!r} returned {len(values)} rewards for {len(completions)} completions")
        columns.append([float("nan") if v is None else float(v) for v in values])
    return torch.tensor(columns, dtype=torch.float32).T
