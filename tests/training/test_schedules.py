"""The LR curve of every schedule: warmup shape, end value, restarts, step drops."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.config import TrainConfig
from adapters.errors import ConfigError
from adapters.training.schedules import add_param_group, build_scheduler, warmup_steps

PEAK = 1e-3


def curve(steps: int = 100, **train) -> list[float]:
    """The LR of each optimizer step (the value used by that step)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK)
    sched = build_scheduler(opt, TrainConfig(lr=PEAK, **train), steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "cosine_with_restarts", "step"])
def test_linear_warmup_reaches_peak(name):
    extra = {"step_size": 30} if name == "step" else {}
    lrs = curve(scheduler=name, warmup_steps=10, **extra)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(PEAK * 0.5)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11]))  # strictly rising through warmup
    assert lrs[10] == pytest.approx(PEAK)


def test_warmup_ratio_rounds_up_and_steps_win():
    assert warmup_steps(TrainConfig(warmup_ratio=0.05), 90) == 5  # ceil(4.5)
    assert warmup_steps(TrainConfig(warmup_ratio=0.05, warmup_steps=7), 90) == 7
    lrs = curve(scheduler="linear", warmup_ratio=0.1)
    assert lrs[10] == pytest.approx(PEAK) and lrs[9] < PEAK


def test_constant_stays_at_peak():
    lrs = curve(scheduler="constant", warmup_steps=5)
    assert all(lr == pytest.approx(PEAK) for lr in lrs[5:])


def test_linear_decays_to_zero():
    lrs = curve(scheduler="linear", warmup_steps=0)
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[50] == pytest.approx(PEAK * 0.5)
    assert lrs[-1] == pytest.approx(PEAK / 100)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))


def test_cosine_halfway_and_end():
    lrs = curve(scheduler="cosine", warmup_steps=0)
    assert lrs[50] == pytest.approx(PEAK * 0.5)
    assert lrs[25] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[-1] < PEAK * 0.001


def test_cosine_with_restarts_jumps_back_to_peak():
    lrs = curve(scheduler="cosine_with_restarts", num_cycles=3, warmup_steps=10)
    # 90 post-warmup steps in 3 cycles of 30: restarts at steps 40 and 70.
    for restart in (40, 70):
        assert lrs[restart - 1] < PEAK * 0.01
        assert lrs[restart] == pytest.approx(PEAK)
    assert lrs[25] == pytest.approx(PEAK * 0.5)  # middle of the first cycle


def test_step_decay_drops_by_gamma():
    lrs = curve(scheduler="step", step_size=20, step_gamma=0.5, warmup_steps=10)
    assert lrs[10] == pytest.approx(PEAK) and lrs[29] == pytest.approx(PEAK)
    assert lrs[30] == pytest.approx(PEAK * 0.5) and lrs[49] == pytest.approx(PEAK * 0.5)
    assert lrs[50] == pytest.approx(PEAK * 0.25)
    assert lrs[99] == pytest.approx(PEAK * 0.5**4)


def test_step_needs_step_size():
    with pytest.raises(ConfigError, match="train.step_size"):
        curve(scheduler="step")


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ConfigError, match="warmup"):
        curve(steps=10, scheduler="cosine", warmup_steps=10)


def test_every_param_group_follows_the_schedule_at_its_own_peak():
    body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": body.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-3}])
    sched = build_scheduler(opt, TrainConfig(scheduler="linear", warmup_steps=0), 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-4, 0.5e-3])


def test_a_group_added_mid_training_joins_the_schedule():
    body, late = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(body.parameters(), lr=1e-3)
    sched = build_scheduler(opt, TrainConfig(scheduler="linear", warmup_steps=0), 10)
    for _ in range(4):
        opt.step()
        sched.step()
    added = add_param_group(opt, {"params": list(late.parameters()), "lr": 2e-3}, sched)
    assert added["lr"] == pytest.approx(2e-3 * 0.6)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 0.5, 2e-3 * 0.5])
    assert sched.get_last_lr() == pytest.approx([1e-3 * 0.5, 2e-3 * 0.5])
