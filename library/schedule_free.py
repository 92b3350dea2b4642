"""Schedule-free optimizers (schedulefree 1.4): AdamWScheduleFree, SGDScheduleFree, RAdamScheduleFree.

They take no LR scheduler: the trainer gets a `DummyScheduler` (`optimizers.get_dummy_scheduler`), as upstream.
The parameters hold y while training and x, the average that is evaluated and saved, in eval mode;
`train_mode()` / `eval_mode()` switch them. `optimizers.get_optimizer` returns the optimizer in train mode, and
the trainer (train_network.py, through `optimizers.get_optimizer_train_eval_fn`) switches to eval mode around
sampling, validation and saving. The state is float32 whatever the parameters' dtype.
"""

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, ops

from library.optimizer_base import (
    _GroupedOptimizer, _const, _f32, _f32_state, _lazy, _log, _one_minus_pow, _scalar, _write,
)


def _warmup(lr, k, k1, warmup_steps):
    """The reference's linear warmup: lr * (k + 1) / warmup_steps in the first warmup_steps steps (k from 0)."""
    if warmup_steps <= 0:
        return lr
    return lr * ops.select(k < warmup_steps, k1 / warmup_steps, _const(1.0))


_sf_adam = ops.MultitypeFuncGraph("sf_adam")


@_sf_adam.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor")
def _sf_adam_update(opts, coefs, z, exp_avg_sq, grad, param):
    """Schedule-free AdamW / RAdam on y (the parameter): y = lerp(y, z, ckp1) + y_coef * g'; z -= lr * g'."""
    beta2, eps, decay, rectified = opts
    first, bias_correction2, adam_phase, ckp1, y_coef, lr = coefs
    y = _f32(param)
    g = _f32(grad)
    z_now = _lazy(first, z, y)
    new_exp_avg_sq = exp_avg_sq * beta2 + g * g * (1.0 - beta2)
    denom = ops.sqrt(new_exp_avg_sq / bias_correction2) + eps
    if rectified:  # RAdam before rho_t > 4: the plain gradient (SGD phase)
        denom = denom * adam_phase + (1.0 - adam_phase)
    g = g / denom
    if decay != 0.0:
        g = g + y * decay
    new_y = y + (z_now - y) * ckp1 + g * y_coef
    return ops.assign(exp_avg_sq, new_exp_avg_sq), ops.assign(z, z_now - g * lr), _write(param, new_y)


_sf_sgd = ops.MultitypeFuncGraph("sf_sgd")


@_sf_sgd.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor")
def _sf_sgd_update(opts, coefs, z, grad, param):
    decay = opts[0]
    first, ckp1, y_coef, lr = coefs
    y = _f32(param)
    g = _f32(grad)
    z_now = _lazy(first, z, y)
    if decay != 0.0:
        g = g + y * decay
    new_y = y + (z_now - y) * ckp1 + g * y_coef
    return ops.assign(z, z_now - g * lr), _write(param, new_y)


class _ScheduleFree(_GroupedOptimizer):
    """Base of the schedule-free optimizers: the parameters hold y while training, x in eval mode.

    The optimizer keeps z (the SGD/Adam sequence) and, per group, the reference's k, lr_max, weight_sum and
    scheduled_lr. x, the average that is evaluated and saved, is y moved away from z: x = lerp(y, z, 1 - 1/beta1).
    `eval_mode()` stores y and puts x into the parameters, `train_mode()` puts the stored y back (bit-exact; the
    reference recomputes y from x and z, which rounds). Both are Python calls between steps, no-ops when the
    optimizer is already in that mode, and do not touch the parameters before the first step (no z yet). The
    mode is optimizer state: a state saved in eval mode resumes into eval mode, and `train_mode()` restores y.
    As the reference, a new optimizer is in eval mode until `train_mode()` (get_optimizer calls it). No LR
    scheduler should drive it (upstream uses a dummy one); warmup is the `warmup_steps` option.
    """

    is_schedule_free = True
    reference_name = ""

    def __init__(self, param_groups, lr, beta1, r, weight_lr_power):
        super().__init__(param_groups, lr)
        self.beta1, self.r, self.weight_lr_power = float(beta1), float(r), float(weight_lr_power)
        groups = range(len(self.group_bounds))
        self.lr_max = ParameterTuple([_scalar(f"group{i}.lr_max", -1.0) for i in groups])
        self.weight_sum = ParameterTuple([_scalar(f"group{i}.weight_sum", 0.0) for i in groups])
        self.scheduled_lr = ParameterTuple([_scalar(f"group{i}.scheduled_lr", 0.0) for i in groups])
        self.initialized = _scalar("initialized", 0.0)
        self.train_mode_flag = Parameter(Tensor(0, ms.int32), name="optimizer.train_mode", requires_grad=False)
        self.z = _f32_state(self.parameters, "z")
        # y while the parameters hold x (eval mode), in the parameters' dtype
        self.y_in_eval = self.parameters.clone(prefix="y_in_eval", init="zeros")

    def _weighting(self, index, k1, lr):
        """The reference's lr_max, weight_sum and ckp1 = weight / weight_sum (0 if weight_sum is 0)."""
        lr_max = ops.maximum(lr, self.lr_max[index])
        weight = ops.ones_like(lr)
        if self.r != 0.0:
            weight = weight * ops.pow(k1, self.r)
        if self.weight_lr_power != 0.0:
            weight = weight * ops.pow(lr_max, self.weight_lr_power)
        weight_sum = self.weight_sum[index] + weight
        nonzero = weight_sum != 0
        ckp1 = ops.select(nonzero, weight / ops.select(nonzero, weight_sum, ops.ones_like(weight_sum)),
                          ops.zeros_like(weight))
        updates = (ops.assign(self.lr_max[index], lr_max), ops.assign(self.weight_sum[index], weight_sum),
                   ops.assign(self.scheduled_lr[index], lr))
        return ckp1, updates

    def _end_of_step(self):
        return (ops.assign(self.step_count, self.step_count + 1), ops.assign(self.initialized, _const(1.0)))

    # -- Python side: train / eval weights ---------------------------------------------------------

    @property
    def is_train_mode(self):
        return bool(int(self.train_mode_flag.asnumpy()))

    def check_train_mode(self):
        """Raise as the reference does when a step is taken in eval mode (call it before the compiled step)."""
        if not self.is_train_mode:
            raise RuntimeError(f"{self.reference_name} is in eval mode: call optimizer.train_mode() before a "
                               "training step (and eval_mode() before sampling, validating or saving)")

    def _has_z(self):
        return float(self.initialized.asnumpy()) != 0.0

    # the switches write in place (ops.assign): Parameter.set_data after a compiled step has run detaches the
    # parameter from graphs compiled with ms.jit (their later updates go to the old buffer; measured, MS 2.10)

    def eval_mode(self):
        """Put x into the parameters (y is kept): before sampling, validation and saving, as upstream's eval()."""
        if not self.is_train_mode:
            return
        if self._has_z():
            weight = 1.0 - 1.0 / self.beta1
            for param, z, y_store in zip(self.parameters, self.z, self.y_in_eval):
                ops.assign(y_store, param)
                y = _f32(param)
                ops.assign(param, ops.cast(y + (z - y) * weight, param.dtype))
        ops.assign(self.train_mode_flag, Tensor(0, ms.int32))

    def train_mode(self):
        """Put y back into the parameters: before training steps, as upstream's train()."""
        if self.is_train_mode:
            return
        if self._has_z():
            for param, y_store in zip(self.parameters, self.y_in_eval):
                ops.assign(param, y_store)
        ops.assign(self.train_mode_flag, Tensor(1, ms.int32))

    def get_scheduled_lrs(self):
        """Each group's lr in the last step, after warmup / RAdam's rectification (the reference's scheduled_lr)."""
        return [float(p.asnumpy()) for p in self.scheduled_lr]


class AdamWScheduleFree(_ScheduleFree):
    """schedulefree.AdamWScheduleFree 1.4.

    Defaults: lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0 (applied at y, inside the step),
    warmup_steps=0 (linear warmup of the lr), r=0, weight_lr_power=2.0.
    """

    reference_name = "AdamWScheduleFree"

    def __init__(self, param_groups, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 r=0.0, weight_lr_power=2.0):
        super().__init__(param_groups, lr, betas[0], r, weight_lr_power)
        self.beta2, self.eps, self.weight_decay = float(betas[1]), float(eps), float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.log_beta2 = _log(self.beta2)
        self.exp_avg_sq = _f32_state(self.parameters, "exp_avg_sq")

    def construct(self, grads):
        k = _f32(self.step_count)
        k1 = k + 1.0
        bias_correction2 = _one_minus_pow(self.log_beta2, k1)
        first = 1.0 - self.initialized
        results = ()
        for i, (start, end) in enumerate(self.group_bounds):
            lr = _warmup(self.group_lrs[i], k, k1, self.warmup_steps)
            ckp1, updates = self._weighting(i, k1, lr)
            coefs = (first, bias_correction2, _const(1.0), ckp1, lr * (self.beta1 * (1.0 - ckp1) - 1.0), lr)
            results += updates + self.hyper_map(
                ops.partial(_sf_adam, (self.beta2, self.eps, self.weight_decay, False), coefs),
                self.z[start:end], self.exp_avg_sq[start:end], grads[start:end], self.parameters[start:end])
        return results + self._end_of_step()


class SGDScheduleFree(_ScheduleFree):
    """schedulefree.SGDScheduleFree 1.4.

    Defaults: lr=1.0, momentum=0.9 (0 < momentum < 1), weight_decay=0, warmup_steps=0, r=0, weight_lr_power=2.
    """

    reference_name = "SGDScheduleFree"

    def __init__(self, param_groups, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0):
        if lr is not None and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if momentum <= 0 or momentum >= 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        super().__init__(param_groups, lr, momentum, r, weight_lr_power)
        self.momentum, self.weight_decay, self.warmup_steps = float(momentum), float(weight_decay), int(warmup_steps)

    def construct(self, grads):
        k = _f32(self.step_count)
        k1 = k + 1.0
        first = 1.0 - self.initialized
        results = ()
        for i, (start, end) in enumerate(self.group_bounds):
            lr = _warmup(self.group_lrs[i], k, k1, self.warmup_steps)
            ckp1, updates = self._weighting(i, k1, lr)
            coefs = (first, ckp1, lr * (self.momentum * (1.0 - ckp1) - 1.0), lr)
            results += updates + self.hyper_map(ops.partial(_sf_sgd, (self.weight_decay,), coefs),
                                                self.z[start:end], grads[start:end], self.parameters[start:end])
        return results + self._end_of_step()


def _radam_rectification(step, beta2):
    """RAdam's (rect, rho_t > 4) at `step` (float64 numpy array), as the reference computes them in Python."""
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    adam = rho_t > 4.0
    safe = np.where(adam, rho_t, 5.0)
    rect = np.sqrt((safe - 4.0) * (safe - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe))
    return rect, adam


def _radam_rect_graph(step, log_beta2, beta2):
    """float32 RAdam rect for large steps, where rho_t is far above 4 (see RAdamScheduleFree)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * ops.exp(step * log_beta2) / _one_minus_pow(log_beta2, step)
    return ops.sqrt((rho_t - 4.0) * (rho_t - 2.0) * (rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0))) / rho_t)


class RAdamScheduleFree(_ScheduleFree):
    """schedulefree.RAdamScheduleFree 1.4 (no warmup option: RAdam's rectification is the warmup).

    Defaults: lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, r=0, weight_lr_power=2.0,
    silent_sgd_phase=True (no parameter change while rho_t <= 4; False: SGD steps then).

    rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t) is a difference of two numbers ~2/(1-beta2) that must come out
    near 4, too inexact in float32: the rectification of the first 10/(1-beta2) steps is computed here in float64
    (as the reference, in Python) into a table; later steps, where rho_t is near rho_inf, use float32 math.
    """

    reference_name = "RAdamScheduleFree"

    def __init__(self, param_groups, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, r=0.0,
                 weight_lr_power=2.0, silent_sgd_phase=True):
        super().__init__(param_groups, lr, betas[0], r, weight_lr_power)
        self.beta2, self.eps, self.weight_decay = float(betas[1]), float(eps), float(weight_decay)
        self.silent_sgd_phase = bool(silent_sgd_phase)
        self.log_beta2 = _log(self.beta2)
        self.exp_avg_sq = _f32_state(self.parameters, "exp_avg_sq")
        self.table_steps = int(min(max(64, math.ceil(10.0 / (1.0 - self.beta2))), 1 << 20))
        rect, adam = _radam_rectification(np.arange(1, self.table_steps + 1, dtype=np.float64), self.beta2)
        rect = np.where(adam, rect, 0.0 if self.silent_sgd_phase else 1.0)
        self.rect_table = Tensor(rect.astype(np.float32))
        self.adam_table = Tensor(adam.astype(np.float32))

    def construct(self, grads):
        k1 = _f32(self.step_count) + 1.0
        in_table = self.step_count < self.table_steps
        index = ops.minimum(self.step_count, self.table_steps - 1)
        rect = ops.select(in_table, ops.gather(self.rect_table, index, 0),
                          _radam_rect_graph(k1, self.log_beta2, self.beta2))
        adam_phase = ops.select(in_table, ops.gather(self.adam_table, index, 0), _const(1.0))
        bias_correction2 = _one_minus_pow(self.log_beta2, k1)
        first = 1.0 - self.initialized
        results = ()
        for i, (start, end) in enumerate(self.group_bounds):
            lr = self.group_lrs[i] * rect
            ckp1, updates = self._weighting(i, k1, lr)
            coefs = (first, bias_correction2, adam_phase, ckp1, lr * (self.beta1 * (1.0 - ckp1) - 1.0), lr)
            results += updates + self.hyper_map(
                ops.partial(_sf_adam, (self.beta2, self.eps, self.weight_decay, True), coefs),
                self.z[start:end], self.exp_avg_sq[start:end], grads[start:end], self.parameters[start:end])
        return results + self._end_of_step()


class DummyScheduler:
    """Upstream's DummyScheduler for schedule-free optimizers: no schedule, reports the group lrs."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass

    def get_last_lr(self):
        return self.optimizer.get_lr()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
