"""LR schedules at chosen steps against hand-computed values."""

import argparse

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

from library import lr_schedulers, optimizers


def make_optimizer(lrs=(1e-3, 5e-4), default_lr=1e-3):
    params = [Parameter(Tensor(np.zeros((2, 2), np.float32)), name=f"w{i}") for i in range(len(lrs))]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(params, lrs)]
    return optimizers.AdamW(groups, lr=default_lr)


def make_args(**overrides):
    parser = argparse.ArgumentParser()
    optimizers.add_optimizer_arguments(parser)
    args = parser.parse_args([])
    args.max_train_steps = 100
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def lrs_at(scheduler, steps):
    """First-group lr after `step()` has been called s times, for each s in steps (increasing)."""
    out, done = [], 0
    for s in steps:
        while done < s:
            scheduler.step()
            done += 1
        out.append(scheduler.get_last_lr()[0])
    return out


def test_constant_with_warmup_ratio():
    # 0.1 of 50 steps = 5 warmup steps; torch's LambdaLR starts at multiplier(0) = 0
    optimizer = make_optimizer()
    scheduler = lr_schedulers.get_scheduler_fix(make_args(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.1, max_train_steps=50), optimizer)
    assert lrs_at(scheduler, [0, 2, 4, 5, 49]) == pytest.approx([0.0, 0.4e-3, 0.8e-3, 1e-3, 1e-3])
    assert optimizer.get_lr() == pytest.approx([1e-3, 5e-4])  # written into the optimizer, every group


def test_linear_with_warmup_steps():
    scheduler = lr_schedulers.get_scheduler_fix(make_args(lr_scheduler="linear", lr_warmup_steps=10), make_optimizer())
    assert lrs_at(scheduler, [5, 10, 55, 100]) == pytest.approx([0.5e-3, 1e-3, 0.5e-3, 0.0])


def test_cosine():
    scheduler = lr_schedulers.get_scheduler_fix(make_args(lr_scheduler="cosine"), make_optimizer())
    assert lrs_at(scheduler, [0, 25, 50, 100]) == pytest.approx([1e-3, 0.85355339e-3, 0.5e-3, 0.0], abs=1e-12)


def test_cosine_with_restarts_cycles():
    args = make_args(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    scheduler = lr_schedulers.get_scheduler_fix(args, make_optimizer())
    # two half-cosines over 100 steps: 0.5 at a quarter, back to 1 at the restart, 0 at the end
    assert lrs_at(scheduler, [25, 49, 50, 75, 100]) == pytest.approx(
        [0.5e-3, 0.5 * (1 + np.cos(np.pi * 0.98)) * 1e-3, 1e-3, 0.5e-3, 0.0], abs=1e-12)


def test_polynomial_power_uses_default_lr_for_every_group():
    args = make_args(lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_warmup_steps=10, max_train_steps=110)
    optimizer = make_optimizer(lrs=(1e-3, 5e-4), default_lr=1e-3)
    scheduler = lr_schedulers.get_scheduler_fix(args, optimizer)
    for _ in range(60):
        scheduler.step()
    # halfway through the decay: ((1e-3 - 1e-7) * 0.5**2 + 1e-7) / 1e-3 = 0.250075
    assert scheduler.get_last_lr() == pytest.approx([2.50075e-4, 1.250375e-4], rel=1e-9)
    for _ in range(140):
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([1e-7, 0.5e-7], rel=1e-9)  # past the end: lr_end / lr_init

    args.lr_scheduler_args = ["lr_end=1e-5"]
    scheduler = lr_schedulers.get_scheduler_fix(args, make_optimizer())
    assert lrs_at(scheduler, [110])[0] == pytest.approx(1e-5)


def test_state_dict_resume_sets_optimizer_lrs():
    args = make_args(lr_scheduler="linear", lr_warmup_steps=10)
    scheduler = lr_schedulers.get_scheduler_fix(args, make_optimizer())
    lrs_at(scheduler, [40])
    state = scheduler.state_dict()
    fresh_optimizer = make_optimizer()
    resumed = lr_schedulers.get_scheduler_fix(args, fresh_optimizer)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 40 and resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert fresh_optimizer.get_lr() == pytest.approx([60 / 90 * 1e-3, 60 / 90 * 5e-4])


def test_adafactor_schedule_reports_optimizer_step_sizes():
    params = [Parameter(Tensor(np.full((3, 2), 0.5, np.float32)), name="w")]
    args = make_args(optimizer_type="Adafactor", learning_rate=1e-3)
    _, _, optimizer = optimizers.get_optimizer(args, [{"params": params, "lr": 1e-3}])
    scheduler = lr_schedulers.get_scheduler_fix(args, optimizer)
    assert scheduler.get_last_lr() == [1e-3]  # initial_lr before any optimizer step
    ms.jit(optimizer.construct)((Tensor(np.ones((3, 2), np.float32)),))
    scheduler.step()
    # relative step at step 1: min(1e-2, 1/sqrt(1)) * max(1e-3, rms(param) = 0.5)
    assert scheduler.get_last_lr() == pytest.approx([5e-3], rel=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (dict(lr_scheduler="constant", lr_warmup_steps=5), "constant_with_warmup"),
    (dict(lr_scheduler="inverse_sqrt"), "not supported"),
    (dict(lr_scheduler="adafactor:0.001"), "must be used with Adafactor"),
    (dict(lr_scheduler="linear", lr_scheduler_args=["lr_end=1e-5"]), "not used by --lr_scheduler linear"),
    (dict(lr_scheduler_type="torch.optim.lr_scheduler.StepLR"), "PyTorch-only"),
])
def test_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        lr_schedulers.get_scheduler_fix(make_args(**overrides), make_optimizer())
