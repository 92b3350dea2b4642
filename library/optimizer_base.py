"""The base of the optimizers in `optimizers`, `adaptive_optimizers` and `schedule_free`.

Each optimizer is an `nn.Cell` used the way mindone's `TrainStep` uses an optimizer: it exposes
`parameters` (a ParameterTuple, the weights TrainStep differentiates) and is called as
`optimizer(grads)` inside the step's `construct`.

- Learning rates live in one float32 Parameter per group, so the LR scheduler changes them from
  Python between steps (`set_lr`) without recompiling the graph.
- All state (moments, step counter, lrs) is Parameters: `state_dict()` / `load_state_dict()` move
  it to and from numpy for --save_state / --resume.
- Results of per-parameter updates must all be returned: MindSpore drops the assigns of HyperMap
  elements whose outputs go unused (seen with Adafactor), even though TrainStep ignores them.
"""

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_F32 = ms.float32


def _f32(x):
    return ops.cast(x, _F32)


def _write(param, value):
    return ops.assign(param, ops.cast(value, param.dtype))


def _normalize_groups(param_groups, lr):
    """[{"params": [...], "lr": x}, ...] or a flat list of Parameters -> list of (params, lr)."""
    param_groups = list(param_groups)
    if not param_groups:
        raise ValueError("the optimizer got no parameters to train")
    if not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]
    groups = []
    for i, group in enumerate(param_groups):
        unknown = set(group) - {"params", "lr"}
        if unknown:
            raise ValueError(f"parameter group {i} has unsupported keys {sorted(unknown)}; only 'params' and 'lr' are")
        params = list(group["params"])
        if not params:
            raise ValueError(f"parameter group {i} is empty")
        groups.append((params, group.get("lr", lr)))
    return groups


class _GroupedOptimizer(nn.Cell):
    """Holds parameters group by group, one lr Parameter per group and a shared step counter.

    Subclasses implement `_update_group(index, lr, step, grads, start, end)` for the parameters
    `self.parameters[start:end]` (one group) and return the results of all their assigns, or their own
    `construct`.
    """

    has_d_estimate = False  # D-Adaptation / Prodigy: get_d_lrs()
    is_schedule_free = False  # schedule-free: train_mode() / eval_mode(), no LR scheduler

    def __init__(self, param_groups, lr, lr_required=True):
        super().__init__()
        groups = _normalize_groups(param_groups, lr)
        if lr_required and any(group_lr is None for _, group_lr in groups):
            raise ValueError("a learning rate is required: pass --learning_rate or give every group an 'lr'")
        self.default_lr = lr  # torch's optimizer.defaults["lr"]; the polynomial schedule divides by it
        self.base_lrs = [group_lr for _, group_lr in groups]
        self.parameters = ParameterTuple([p for params, _ in groups for p in params])
        bounds, start = [], 0
        for params, _ in groups:
            bounds.append((start, start + len(params)))
            start += len(params)
        self.group_bounds = bounds
        self.group_lrs = ParameterTuple(
            [
                Parameter(Tensor(0.0 if group_lr is None else group_lr, _F32), name=f"optimizer.group{i}.lr", requires_grad=False)
                for i, group_lr in enumerate(self.base_lrs)
            ]
        )
        self.step_count = Parameter(Tensor(0, ms.int32), name="optimizer.step", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads):
        step = self.step_count + 1
        ops.assign(self.step_count, step)
        step = _f32(step)
        results = ()
        for i, (start, end) in enumerate(self.group_bounds):
            results += self._update_group(i, self.group_lrs[i], step, grads[start:end], start, end)
        return results

    def _update_group(self, index, lr, step, grads, start, end):
        raise NotImplementedError

    # -- Python-side API for the training loop ------------------------------------------------

    def get_lr(self):
        return [float(p.asnumpy()) for p in self.group_lrs]

    def set_lr(self, lrs):
        if len(lrs) != len(self.group_lrs):
            raise ValueError(f"expected {len(self.group_lrs)} learning rates, got {len(lrs)}")
        for param, lr in zip(self.group_lrs, lrs):
            param.set_data(Tensor(lr, _F32))

    def state_parameters(self):
        """Every Parameter the optimizer owns (not the trained ones), by name."""
        trained = {id(p) for p in self.parameters}
        return {p.name: p for p in self.get_parameters() if id(p) not in trained}

    def state_dict(self):
        return {name: p.asnumpy().copy() for name, p in self.state_parameters().items()}

    def load_state_dict(self, state):
        own = self.state_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"optimizer state does not match: missing {missing}, unexpected {unexpected}")
        for name, param in own.items():
            value = np.asarray(state[name])
            if value.shape != tuple(param.shape):
                raise ValueError(f"optimizer state {name}: shape {value.shape}, expected {tuple(param.shape)}")
            param.set_data(Tensor(value, param.dtype))


# ---------------------------------------------------------------------------------------------
# small helpers of the D-Adaptation / Prodigy / schedule-free optimizers


def _const(value):
    return Tensor(value, _F32)


def _log(base):
    return math.log(base) if base > 0 else -math.inf


def _one_minus_pow(log_base, t):
    """1 - base**t from log(base): no float32 cancellation when base is close to 1 (1 - 0.999**t)."""
    if log_base == -math.inf:  # base 0
        return ops.ones_like(t)
    return -ops.expm1(t * log_base)


def _lazy(first, stored, current):
    """`current` in the step that creates the state (first == 1), else `stored`; exact for finite values."""
    return stored * (1.0 - first) + current * first


def _scalar(name, value=0.0):
    """A float32 scalar state Parameter named optimizer.<name>."""
    return Parameter(_const(value), name=f"optimizer.{name}", requires_grad=False)


def _f32_state(params, prefix, fill=0.0, slice_p=1):
    """float32 state per trained parameter, named <prefix>.<parameter name>; every slice_p-th entry, flattened."""

    def shape(p):
        if slice_p == 1:
            return tuple(p.shape)
        return (-(-int(np.prod(p.shape, dtype=np.int64)) // slice_p),)

    return ParameterTuple([
        Parameter(Tensor(np.full(shape(p), fill, np.float32)), name=f"{prefix}.{p.name}", requires_grad=False)
        for p in params
    ])
