"""Learning-rate schedules of upstream's `train_util.get_scheduler_fix`, as plain Python.

The multipliers are the ones of transformers' `get_scheduler` (which Kohya uses), applied like torch's
LambdaLR: lr = base_lr * multiplier(step), starting at step 0 when the scheduler is built, and
`step()` is called once after every optimizer step. The scheduler writes the lrs into the
optimizer's lr Parameters (`optimizer.set_lr`), so a compiled train step picks them up.
"""

import ast
import math

from library.optimizers import Adafactor

SUPPORTED_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor")


def _warmup(step, num_warmup_steps):
    return step / max(1, num_warmup_steps)


def constant_lambda():
    return lambda step: 1.0


def constant_with_warmup_lambda(num_warmup_steps):
    return lambda step: _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def linear_lambda(num_warmup_steps, num_training_steps):
    def multiplier(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))

    return multiplier


def cosine_lambda(num_warmup_steps, num_training_steps, num_cycles=0.5):
    """num_cycles=0.5 is a half cosine from 1 down to 0."""

    def multiplier(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return multiplier


def cosine_with_restarts_lambda(num_warmup_steps, num_training_steps, num_cycles=1):
    """num_cycles half cosines, each starting again from 1 (hard restarts)."""

    def multiplier(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))

    return multiplier


def polynomial_lambda(num_warmup_steps, num_training_steps, lr_init, lr_end=1e-7, power=1.0):
    """Decay from lr_init to lr_end as (1 - progress)**power.

    As in transformers, lr_init is the optimizer's default lr (--learning_rate) and the multiplier
    is applied to every group's own base lr, so a group with another lr ends at base * lr_end / lr_init.
    """
    if not lr_init > lr_end:
        raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")

    def multiplier(step):
        if step < num_warmup_steps:
            return _warmup(step, num_warmup_steps)
        if step > num_training_steps:
            return lr_end / lr_init
        pct_remaining = 1 - (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)
        return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init

    return multiplier


class LambdaLRScheduler:
    """torch's LambdaLR over our optimizers: lr of group g at step s = base_lrs[g] * lr_lambda(s)."""

    def __init__(self, optimizer, lr_lambda):
        self.optimizer = optimizer
        self.lr_lambda = lr_lambda
        self.base_lrs = list(optimizer.base_lrs)
        self.last_epoch = 0  # torch's name: the number of step() calls so far
        self._apply()

    def _apply(self):
        factor = self.lr_lambda(self.last_epoch)
        self._last_lr = [base * factor for base in self.base_lrs]
        self.optimizer.set_lr(self._last_lr)

    def step(self):
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


class AdafactorSchedule:
    """transformers' AdafactorSchedule: reports the step sizes Adafactor chose, initial_lr before any step."""

    def __init__(self, optimizer, initial_lr=0.0):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.last_epoch = 0
        self._last_lr = self._current()

    def _current(self):
        if int(self.optimizer.step_count.asnumpy()) == 0:
            return [self.initial_lr] * len(self.optimizer.base_lrs)
        return self.optimizer.get_last_lrs()

    def step(self):
        self.last_epoch += 1
        self._last_lr = self._current()

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        self.last_epoch = int(state["last_epoch"])
        self._last_lr = self._current()


def _steps_or_ratio(value, num_training_steps):
    # --lr_warmup_steps: a float < 1 is a ratio of the training steps
    if isinstance(value, float) and value < 1:
        return int(value * num_training_steps)
    return int(value)


def _parse_scheduler_args(scheduler_args, accepted, name):
    kwargs = {}
    for arg in scheduler_args or []:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"--lr_scheduler_args entries must look like key=value; got {arg!r}")
        if key not in accepted:
            raise ValueError(f"--lr_scheduler_args {key} is not used by --lr_scheduler {name}; accepted: {sorted(accepted) or 'none'}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"--lr_scheduler_args {arg!r}: {value!r} is not a Python literal") from e
    return kwargs


def get_scheduler_fix(args, optimizer):
    """The LR scheduler for --lr_scheduler, with upstream's checks.

    Call after `optimizers.get_optimizer` (Adafactor's relative_step turns --lr_scheduler into
    "adafactor:<lr>"). Uses args.max_train_steps, lr_warmup_steps (steps or ratio),
    lr_scheduler_num_cycles, lr_scheduler_power and lr_scheduler_args.
    """
    name = args.lr_scheduler
    if getattr(args, "lr_scheduler_type", ""):
        raise ValueError(f"--lr_scheduler_type {args.lr_scheduler_type}: custom scheduler classes are PyTorch-only; "
                         f"use --lr_scheduler with one of {', '.join(SUPPORTED_SCHEDULERS)}")
    num_training_steps = args.max_train_steps
    num_warmup_steps = _steps_or_ratio(args.lr_warmup_steps or 0, num_training_steps)

    def no_warmup(scheduler):
        if num_warmup_steps != 0:
            raise ValueError(f"{name} does not require `num_warmup_steps`. Set None or 0."
                             + (" (use --lr_scheduler constant_with_warmup for a warmup)" if name == "constant" else ""))
        return scheduler

    if name.startswith("adafactor"):
        if not isinstance(optimizer, Adafactor) or not optimizer.relative_step:
            raise ValueError("adafactor scheduler must be used with Adafactor optimizer (relative_step=True)")
        _, _, initial_lr = name.partition(":")
        return no_warmup(AdafactorSchedule(optimizer, float(initial_lr) if initial_lr else 0.0))

    accepted = {"cosine": {"num_cycles"}, "polynomial": {"lr_end"}}.get(name, set())
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"--lr_scheduler {name} is not supported; use one of {', '.join(SUPPORTED_SCHEDULERS)}")
    kwargs = _parse_scheduler_args(getattr(args, "lr_scheduler_args", None), accepted, name)

    if name == "constant":
        return no_warmup(LambdaLRScheduler(optimizer, constant_lambda()))
    if name == "constant_with_warmup":
        return LambdaLRScheduler(optimizer, constant_with_warmup_lambda(num_warmup_steps))
    if name == "linear":
        return LambdaLRScheduler(optimizer, linear_lambda(num_warmup_steps, num_training_steps))
    if name == "cosine":
        return LambdaLRScheduler(optimizer, cosine_lambda(num_warmup_steps, num_training_steps, **kwargs))
    if name == "cosine_with_restarts":
        return LambdaLRScheduler(
            optimizer, cosine_with_restarts_lambda(num_warmup_steps, num_training_steps, args.lr_scheduler_num_cycles)
        )
    return LambdaLRScheduler(
        optimizer,
        polynomial_lambda(num_warmup_steps, num_training_steps, optimizer.default_lr, power=args.lr_scheduler_power, **kwargs),
    )
