"""D-Adaptation and Prodigy: optimizers that estimate their own step size d; the lr multiplies it (~1.0).

The update rules follow prodigyopt 1.1.2's Prodigy and dadaptation 3.2's DAdaptAdam / DAdaptLion / DAdaptSGD /
DAdaptAdaGrad / DAdaptAdan and its experimental DAdaptAdanIP / DAdaptAdamPreprint.

- One d for all groups (`_GlobalDOptimizer`, `has_d_estimate`): `get_d_lrs()` gives d*lr per group
  (upstream's lr/d*lr/<group> TensorBoard values; `optimizers.d_lr_logs` builds those entries).
- The state is float32 whatever the parameters' dtype; the parameters are written back in theirs.
- A first pass that returns sums ties its assigns to them with ops.depend (`_pack`), as every result
  must be returned (see `optimizer_base`).
- Inside one graph, reading a Parameter after an assign to it gives the new value: code that needs the
  old value (D-Adaptation's numerators) reads it before the assign.
"""

import logging
import math

import mindspore as ms
from mindspore import ops

from library.optimizer_base import (
    _F32, _GroupedOptimizer, _const, _f32, _f32_state, _lazy, _log, _one_minus_pow, _scalar, _write,
)

logger = logging.getLogger(__name__)


def _every(x, step):
    """x.flatten()[::step] (Prodigy's slice_p); x itself for step 1."""
    return x if step == 1 else x.reshape(-1)[::step]


def _sum(x):
    return ops.reduce_sum(x)


def _pack(sums, updates):
    """The per-parameter sums of a first pass, tied to that pass' assigns so that none is dropped."""
    return ops.depend(ops.stack(sums), updates)


def _grad(grad, param, decay):
    """The gradient in float32, with coupled (L2) weight decay when decay is not 0."""
    g = _f32(grad)
    if decay != 0.0:
        g = g + _f32(param) * decay
    return g


def _bias_correction(log_beta1, log_beta2, step_count):
    """Adam's sqrt(1 - beta2^k) / (1 - beta1^k) for the step k = step_count + 1 (use_bias_correction)."""
    k1 = _f32(step_count) + 1.0
    return ops.sqrt(_one_minus_pow(log_beta2, k1)) / _one_minus_pow(log_beta1, k1)


class _GlobalDOptimizer(_GroupedOptimizer):
    """Base of the D-Adaptation and Prodigy optimizers: one step-size estimate `d` shared by all groups.

    The reference optimizers keep d in every param group, but compute it from sums over all groups and write
    the same value into each; here it is one Parameter. `construct` makes a first pass over all parameters
    (state updates and the sums d is estimated from), computes the new d, then a second pass (the parameter
    updates). When the sums show no progress (all active lrs 0, as in the first step of a warmup, or all
    gradients 0), the reference returns before the second pass: the parameters, d and the step counter stay;
    the first pass' state updates remain. `step_count` counts the completed steps (the reference's k).

    lr_rule "max": the lr is the largest group lr and every group's lr must be it or 0 (the reference raises
    at the first step otherwise; here the constructor and set_lr do). lr_rule "first": the first group's lr
    is used for every group (DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP ignore the other groups' lrs).
    """

    has_d_estimate = True
    reference_name = ""

    def __init__(self, param_groups, lr, d0, lr_rule="max", lazy_init=False, log_every=0, fsdp_in_use=False):
        super().__init__(param_groups, lr)
        self.lr_rule = lr_rule
        self._check_lrs(self.base_lrs)
        if lr_rule == "first" and len(set(self.base_lrs)) > 1:
            logger.warning(f"{self.reference_name} uses the first parameter group's lr ({self.base_lrs[0]}) for all "
                           f"groups: the other groups' lrs {self.base_lrs[1:]} have no effect")
        if log_every:
            logger.info(f"{self.reference_name}: log_every has no effect (the step runs in a graph); "
                        "d is logged as lr/d*lr/<group> instead")
        if fsdp_in_use:
            logger.info(f"{self.reference_name}: fsdp_in_use has no effect (no sharded parameters here)")
        self.d0 = float(d0)
        self.d = _scalar("d", d0)
        # 1 once the first step has copied the initial weights (Prodigy's p0, the x0 of DAdaptSGD/AdaGrad)
        self.initialized = _scalar("initialized", 0.0) if lazy_init else None

    # -- construction helpers --------------------------------------------------------------------

    def _state(self, prefix, fill=0.0, slice_p=1):
        return _f32_state(self.parameters, prefix, fill, slice_p)

    def _check_lrs(self, lrs):
        if self.lr_rule != "max":
            return
        top = max(lrs)
        if any(lr not in (top, 0.0) for lr in lrs):
            raise ValueError(f"{self.reference_name}: parameter groups with different learning rates are only "
                             f"supported when the others are 0 (got {list(lrs)}); give the text encoder and the U-Net "
                             "the same lr, or 0 to freeze one")

    # -- graph helpers ---------------------------------------------------------------------------

    def _lr(self):
        if self.lr_rule == "first":
            return self.group_lrs[0]
        lr = self.group_lrs[0]
        for i in range(1, len(self.group_lrs)):
            lr = ops.maximum(lr, self.group_lrs[i])
        return lr

    def _active(self, index):
        """(group lr > 0, as a bool and as 0/1): the reference's first pass skips groups whose lr is 0."""
        on = self.group_lrs[index] > 0
        return on, ops.cast(on, _F32)

    def _first(self):
        return 1.0 - self.initialized

    def _map(self, fn, opts, coefs, tuples, start=0, end=None):
        end = len(self.parameters) if end is None else end
        return self.hyper_map(ops.partial(fn, opts, coefs), *(t[start:end] for t in tuples))

    def _growth(self, d, d_hat):
        """max(d, min(d_hat, d * growth_rate)): D-Adaptation's non-decreasing d."""
        return ops.maximum(d, ops.minimum(d_hat, d * self.growth_rate))

    @staticmethod
    def _keep(on, beta):
        """A running average's decay: beta in a group that steps, 1 (the state stays) in one whose lr is 0."""
        return ops.select(on, _const(beta), _const(1.0))

    @staticmethod
    def _safe(proceed, x):
        return ops.select(proceed, x, ops.ones_like(x))

    def _finish(self, proceed, d_new, kept):
        """The end of a step: d and the `kept` (Parameter, value) pairs are written only if the step proceeds."""
        results = (ops.assign(self.d, ops.select(proceed, d_new, self.d)),)
        for param, value in kept:
            results += (ops.assign(param, ops.select(proceed, value, param)),)
        results += (ops.assign(self.step_count, self.step_count + ops.cast(proceed, ms.int32)),)
        if self.initialized is not None:
            results += (ops.assign(self.initialized, _const(1.0)),)
        return results

    # -- Python side -----------------------------------------------------------------------------

    def set_lr(self, lrs):
        self._check_lrs(list(lrs))
        super().set_lr(lrs)

    def get_d(self):
        return float(self.d.asnumpy())

    def get_d_lrs(self):
        """d * lr per group: upstream's lr/d*lr/<group> values (param_groups[i]["d"] * param_groups[i]["lr"])."""
        d = self.get_d()
        return [d * lr for lr in self.get_lr()]


def _check_betas(betas, count=2):
    for i in range(count):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")


def _check_positive(d0=None, lr=None, eps=None):
    if d0 is not None and not d0 > 0.0:
        raise ValueError(f"Invalid d0 value: {d0}")
    if lr is not None and not lr > 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not eps > 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")


# ---------------------------------------------------------------------------------------------
# Prodigy (prodigyopt 1.1.2)

_prodigy_pass1 = ops.MultitypeFuncGraph("prodigy_pass1")


@_prodigy_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _prodigy_pass1_update(opts, coefs, s, p0, exp_avg, exp_avg_sq, grad, param):
    has_exp_avg, coupled_decay, slice_p = opts
    first, m_keep, m_add, v_keep, v_add, s_keep, s_add, numerator_coef, active = coefs
    p = _f32(param)
    g = _grad(grad, param, coupled_decay)
    g_sliced, p_sliced = _every(g, slice_p), _every(p, slice_p)
    new_p0 = _lazy(first, p0, p_sliced)
    numerator = _sum(g_sliced * (new_p0 - p_sliced)) * numerator_coef
    new_s = s * s_keep + g_sliced * s_add
    updates = (ops.assign(p0, new_p0), ops.assign(exp_avg_sq, exp_avg_sq * v_keep + g * g * v_add),
               ops.assign(s, new_s))
    if has_exp_avg:
        updates += (ops.assign(exp_avg, exp_avg * m_keep + g * m_add),)
    return _pack([numerator, _sum(ops.abs(new_s)) * active], updates)


_prodigy_pass2 = ops.MultitypeFuncGraph("prodigy_pass2")


@_prodigy_pass2.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor")
def _prodigy_pass2_update(opts, coefs, exp_avg, exp_avg_sq, grad, param):
    has_exp_avg, coupled_decay, decoupled_decay = opts
    step, decay_step, d_eps, grad_step = coefs
    p = _f32(param)
    denom = ops.sqrt(exp_avg_sq) + d_eps
    if has_exp_avg:
        update = exp_avg / denom * step
    else:  # beta1 == 0: the (coupled-decayed) gradient itself
        update = _grad(grad, param, coupled_decay) / denom * grad_step
    if decoupled_decay != 0.0:
        p = p - p * decay_step
    return _write(param, p - update)


class Prodigy(_GlobalDOptimizer):
    """prodigyopt.Prodigy 1.1.2: Adam whose step size d is estimated from the distance to the initial weights.

    Options and defaults as prodigyopt: lr=1.0, betas=(0.9, 0.999), beta3=None (sqrt(beta2)), eps=1e-8,
    weight_decay=0, decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
    growth_rate=inf, fsdp_in_use=False (no effect here), slice_p=1 (every slice_p-th entry of each tensor
    feeds the d estimate). The per-parameter p0 (the weights at the first step) is taken in that step.
    """

    reference_name = "Prodigy"

    def __init__(self, param_groups, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0,
                 decouple=True, use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                 growth_rate=float("inf"), fsdp_in_use=False, slice_p=1):
        _check_positive(d0=d0, lr=lr, eps=eps)
        _check_betas(betas)
        if int(slice_p) != slice_p or slice_p < 1:
            raise ValueError(f"slice_p must be a positive integer; got {slice_p}")
        super().__init__(param_groups, lr, d0, lr_rule="max", lazy_init=True, fsdp_in_use=fsdp_in_use)
        if decouple and weight_decay > 0:
            logger.info("Prodigy: using decoupled weight decay")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.beta3 = math.sqrt(self.beta2) if beta3 is None else float(beta3)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decouple, self.use_bias_correction = bool(decouple), bool(use_bias_correction)
        self.safeguard_warmup = bool(safeguard_warmup)
        self.d_coef, self.growth_rate, self.slice_p = float(d_coef), float(growth_rate), int(slice_p)
        self.log_beta1, self.log_beta2 = _log(self.beta1), _log(self.beta2)
        self.d_max = _scalar("d_max", d0)
        self.d_numerator = _scalar("d_numerator", 0.0)
        self.s = self._state("s", slice_p=self.slice_p)
        self.p0 = self._state("p0", slice_p=self.slice_p)
        self.exp_avg = self._state("exp_avg") if self.beta1 > 0 else None
        self.exp_avg_sq = self._state("exp_avg_sq")
        coupled = self.weight_decay if not self.decouple else 0.0
        self.pass1_opts = (self.beta1 > 0, coupled, self.slice_p)
        self.pass2_opts = (self.beta1 > 0, coupled, self.weight_decay if self.decouple else 0.0)

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        if self.use_bias_correction:
            dlr = dlr * _bias_correction(self.log_beta1, self.log_beta2, self.step_count)
        d_ratio = d / self.d0
        exp_avg = self.exp_avg_sq if self.exp_avg is None else self.exp_avg  # placeholder when beta1 == 0
        sums = ()
        for i, (start, end) in enumerate(self.group_bounds):
            on, active = self._active(i)
            coefs = (
                self._first(),
                self._keep(on, self.beta1), active * d * (1.0 - self.beta1),
                self._keep(on, self.beta2), active * d * d * (1.0 - self.beta2),
                self._keep(on, self.beta3),
                active * d_ratio * (d if self.safeguard_warmup else dlr),
                active * d_ratio * dlr, active,
            )
            sums += self._map(_prodigy_pass1, self.pass1_opts, coefs,
                              (self.s, self.p0, exp_avg, self.exp_avg_sq, grads, self.parameters), start, end)
        total = ops.addn(sums)
        d_numerator = self.d_numerator * self.beta3 + total[0]
        proceed = total[1] != 0
        d_hat = self.d_coef * d_numerator / self._safe(proceed, total[1])
        new_d = ops.select(d == _const(self.d0), ops.maximum(d, d_hat), d)
        d_max = ops.maximum(self.d_max, d_hat)
        new_d = ops.minimum(d_max, new_d * self.growth_rate)

        go = ops.cast(proceed, _F32)
        coefs = (go * dlr, go * self.weight_decay * dlr, new_d * self.eps, go * dlr * new_d)
        results = self._map(_prodigy_pass2, self.pass2_opts, coefs, (exp_avg, self.exp_avg_sq, grads, self.parameters))
        return results + self._finish(proceed, new_d, ((self.d_max, d_max), (self.d_numerator, d_numerator)))


# ---------------------------------------------------------------------------------------------
# D-Adaptation (dadaptation 3.2)

_dadapt_adam_pass1 = ops.MultitypeFuncGraph("dadapt_adam_pass1")


@_dadapt_adam_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_adam_pass1_update(opts, coefs, s, exp_avg, exp_avg_sq, grad, param):
    coupled_decay, eps = opts
    m_keep, m_add, v_keep, v_add, s_keep, s_add, numerator_coef, active = coefs
    g = _grad(grad, param, coupled_decay)
    numerator = _sum(g * (s / (ops.sqrt(exp_avg_sq) + eps))) * numerator_coef  # s and exp_avg_sq before the step
    new_s = s * s_keep + g * s_add
    updates = (ops.assign(exp_avg, exp_avg * m_keep + g * m_add),
               ops.assign(exp_avg_sq, exp_avg_sq * v_keep + g * g * v_add), ops.assign(s, new_s))
    return _pack([numerator, _sum(ops.abs(new_s)) * active], updates)


_dadapt_adam_pass2 = ops.MultitypeFuncGraph("dadapt_adam_pass2")


@_dadapt_adam_pass2.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor")
def _dadapt_adam_pass2_update(opts, coefs, exp_avg, exp_avg_sq, param):
    decoupled_decay, eps = opts
    go, decay_step = coefs
    p = _f32(param)
    if decoupled_decay != 0.0:
        p = p - p * decay_step
    return _write(param, p - exp_avg / (ops.sqrt(exp_avg_sq) + eps) * go)


class DAdaptAdam(_GlobalDOptimizer):
    """dadaptation.DAdaptAdam 3.2: Adam with the D-Adaptation step size (the layer_scale group key is not supported).

    Defaults as dadaptation: lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, log_every=0, decouple=False,
    use_bias_correction=False, d0=1e-6, growth_rate=inf, fsdp_in_use=False. The first moment carries d*lr.
    """

    reference_name = "DAdaptAdam"

    def __init__(self, param_groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0,
                 decouple=False, use_bias_correction=False, d0=1e-6, growth_rate=float("inf"), fsdp_in_use=False):
        _check_positive(d0=d0, lr=lr, eps=eps)
        _check_betas(betas)
        super().__init__(param_groups, lr, d0, lr_rule="max", log_every=log_every, fsdp_in_use=fsdp_in_use)
        if decouple:
            logger.info("DAdaptAdam: using decoupled weight decay")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.sqrt_beta2 = math.sqrt(self.beta2)
        self.eps, self.weight_decay, self.decouple = float(eps), float(weight_decay), bool(decouple)
        self.use_bias_correction, self.growth_rate = bool(use_bias_correction), float(growth_rate)
        self.log_beta1, self.log_beta2 = _log(self.beta1), _log(self.beta2)
        self.numerator_weighted = _scalar("numerator_weighted", 0.0)
        self.s = self._state("s")
        self.exp_avg = self._state("exp_avg")
        self.exp_avg_sq = self._state("exp_avg_sq")
        self.pass1_opts = (0.0 if self.decouple else self.weight_decay, self.eps)
        self.pass2_opts = (self.weight_decay if self.decouple else 0.0, self.eps)

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        if self.use_bias_correction:
            dlr = dlr * _bias_correction(self.log_beta1, self.log_beta2, self.step_count)
        sqrt_beta2 = self.sqrt_beta2
        sums = ()
        for i, (start, end) in enumerate(self.group_bounds):
            on, active = self._active(i)
            coefs = (self._keep(on, self.beta1), active * dlr * (1.0 - self.beta1),
                     self._keep(on, self.beta2), active * (1.0 - self.beta2),
                     self._keep(on, sqrt_beta2), active * dlr * (1.0 - sqrt_beta2),
                     active * dlr, active)
            sums += self._map(_dadapt_adam_pass1, self.pass1_opts, coefs,
                              (self.s, self.exp_avg, self.exp_avg_sq, grads, self.parameters), start, end)
        total = ops.addn(sums)
        numerator_weighted = sqrt_beta2 * self.numerator_weighted + (1.0 - sqrt_beta2) * total[0]
        proceed = total[1] != 0
        d_hat = numerator_weighted / ((1.0 - sqrt_beta2) * self._safe(proceed, total[1]))
        new_d = self._growth(d, d_hat)
        go = ops.cast(proceed, _F32)
        results = self._map(_dadapt_adam_pass2, self.pass2_opts, (go, go * self.weight_decay * dlr),
                            (self.exp_avg, self.exp_avg_sq, self.parameters))
        return results + self._finish(proceed, new_d, ((self.numerator_weighted, numerator_weighted),))


_dadapt_lion = ops.MultitypeFuncGraph("dadapt_lion")


@_dadapt_lion.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_lion_update(opts, coefs, s, exp_avg, grad, param):
    beta1, beta2, sqrt_beta2 = opts
    dlr, decay_keep, m_add, s_add = coefs
    g = _f32(grad)
    p = _f32(param) * decay_keep
    update = ops.sign(exp_avg * beta1 + g * (1.0 - beta1))
    numerator = _sum(update * s) * dlr
    new_s = s * sqrt_beta2 + update * s_add
    updates = (_write(param, p - update * dlr), ops.assign(exp_avg, exp_avg * beta2 + g * m_add), ops.assign(s, new_s))
    return _pack([numerator, _sum(ops.abs(new_s))], updates)


class DAdaptLion(_GlobalDOptimizer):
    """dadaptation.DAdaptLion 3.2: Lion with the D-Adaptation step size.

    Defaults: lr=1.0, betas=(0.9, 0.99), weight_decay=0, log_every=0, d0=1e-6, fsdp_in_use=False. As the
    reference, every group (one whose lr is 0 too) takes the step with d * max(group lrs), decoupled decay included.
    """

    reference_name = "DAdaptLion"

    def __init__(self, param_groups, lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, log_every=0, d0=1e-6,
                 fsdp_in_use=False):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_betas(betas)
        super().__init__(param_groups, lr, d0, lr_rule="max", log_every=log_every, fsdp_in_use=fsdp_in_use)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.sqrt_beta2 = math.sqrt(self.beta2)
        self.weight_decay = float(weight_decay)
        self.numerator_weighted = _scalar("numerator_weighted", 0.0)
        self.exp_avg = self._state("exp_avg")
        self.s = self._state("s")
        self.opts = (self.beta1, self.beta2, self.sqrt_beta2)

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        coefs = (dlr, 1.0 - dlr * self.weight_decay, (1.0 - self.beta2) * dlr, (1.0 - self.sqrt_beta2) * dlr)
        total = ops.addn(self._map(_dadapt_lion, self.opts, coefs, (self.s, self.exp_avg, grads, self.parameters)))
        numerator_weighted = self.sqrt_beta2 * self.numerator_weighted + (1.0 - self.sqrt_beta2) * total[0]
        proceed = total[1] != 0
        d_hat = numerator_weighted / ((1.0 - self.sqrt_beta2) * self._safe(proceed, total[1]))
        new_d = ops.select(lr > 0, ops.maximum(d, d_hat), d)
        return self._finish(proceed, new_d, ((self.numerator_weighted, numerator_weighted),))


_sum_sq = ops.MultitypeFuncGraph("sum_sq")


@_sum_sq.register("Tensor", "Tensor")
def _sum_sq_of(active, grad):
    g = _f32(grad)
    return _sum(g * g) * active


_dadapt_sgd_pass1 = ops.MultitypeFuncGraph("dadapt_sgd_pass1")


@_dadapt_sgd_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_sgd_pass1_update(opts, coefs, s, x0, grad, param):
    decay = opts[0]
    first, step, active = coefs
    p = _f32(param)
    g = _grad(grad, param, decay)
    numerator = _sum(g * s) * step
    new_s = s + g * step
    updates = (ops.assign(x0, _lazy(first, x0, p)), ops.assign(s, new_s))
    return _pack([numerator, _sum(new_s * new_s) * active], updates)


_dadapt_x0_minus = ops.MultitypeFuncGraph("dadapt_x0_minus")


@_dadapt_x0_minus.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_x0_minus_update(opts, coefs, s, x0, scale, param):
    """DAdaptSGD / DAdaptAdaGrad second pass: z = x0 - s (/ scale); p = p * keep + z * z_coef."""
    divide = opts[0]
    keep, z_coef = coefs
    z = x0 - s / scale if divide else x0 - s
    return _write(param, _f32(param) * keep + z * z_coef)


class DAdaptSGD(_GlobalDOptimizer):
    """dadaptation.DAdaptSGD 3.2: SGD (dual averaging form) with the D-Adaptation step size.

    Defaults: lr=1.0, momentum=0, weight_decay=0, log_every=0, d0=1e-6, growth_rate=inf, fsdp_in_use=False.
    The step is d*lr/||g0||, g0 the first step's gradient (without weight decay) of the groups whose lr is > 0.
    """

    reference_name = "DAdaptSGD"

    def __init__(self, param_groups, lr=1.0, momentum=0.0, weight_decay=0.0, log_every=0, d0=1e-6,
                 growth_rate=float("inf"), fsdp_in_use=False):
        _check_positive(d0=d0, lr=lr)
        super().__init__(param_groups, lr, d0, lr_rule="max", lazy_init=True, log_every=log_every,
                         fsdp_in_use=fsdp_in_use)
        self.momentum, self.weight_decay, self.growth_rate = float(momentum), float(weight_decay), float(growth_rate)
        self.numerator_weighted = _scalar("numerator_weighted", 0.0)
        self.g0_norm = _scalar("g0_norm", 0.0)
        self.s = self._state("s")
        self.x0 = self._state("x0")

    def construct(self, grads):
        lr, d = self._lr(), self.d
        first_step = self.step_count == 0
        g_sq = ()
        for i, (start, end) in enumerate(self.group_bounds):
            g_sq += self.hyper_map(ops.partial(_sum_sq, self._active(i)[1]), grads[start:end])
        g0_norm = ops.select(first_step, ops.sqrt(ops.addn(g_sq)), self.g0_norm)
        has_g0 = g0_norm > 0  # the reference divides by zero here
        dlr = ops.select(has_g0, d * lr / self._safe(has_g0, g0_norm), ops.zeros_like(d))
        sums = ()
        for i, (start, end) in enumerate(self.group_bounds):
            active = self._active(i)[1]
            sums += self._map(_dadapt_sgd_pass1, (self.weight_decay,), (self._first(), active * dlr, active),
                              (self.s, self.x0, grads, self.parameters), start, end)
        total = ops.addn(sums)
        numerator_weighted = self.numerator_weighted + total[0]
        proceed = ops.logical_and(total[1] != 0, lr > 0)
        d_hat = 2.0 * numerator_weighted / ops.sqrt(self._safe(proceed, total[1]))
        new_d = self._growth(d, d_hat)
        ck = 1.0 - self.momentum
        coefs = (ops.select(proceed, _const(1.0 - ck), _const(1.0)), ops.cast(proceed, _F32) * ck)
        results = self._map(_dadapt_x0_minus, (False,), coefs, (self.s, self.x0, self.s, self.parameters))
        return results + self._finish(proceed, new_d, ((self.numerator_weighted, numerator_weighted),
                                                        (self.g0_norm, g0_norm)))


_dadapt_adagrad_pass1 = ops.MultitypeFuncGraph("dadapt_adagrad_pass1")


@_dadapt_adagrad_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_adagrad_pass1_update(opts, coefs, sk, alphak, x0, grad, param):
    decay, eps = opts
    first, dlr = coefs
    p = _f32(param)
    g = _grad(grad, param, decay)
    old_scale = ops.sqrt(alphak) + eps
    old_sksq, old_l1 = _sum(sk * sk / old_scale), _sum(ops.abs(sk))
    new_alphak = alphak + g * g
    scale = ops.sqrt(new_alphak) + eps
    g_sq = _sum(g * g / scale)
    new_sk = sk + g * dlr
    updates = (ops.assign(x0, _lazy(first, x0, p)), ops.assign(alphak, new_alphak), ops.assign(sk, new_sk))
    return _pack([g_sq, _sum(new_sk * new_sk / scale) - old_sksq, _sum(ops.abs(new_sk)) - old_l1], updates)


_sqrt_plus = ops.MultitypeFuncGraph("sqrt_plus")


@_sqrt_plus.register("Number", "Tensor")
def _sqrt_plus_of(eps, x):
    return ops.sqrt(x) + eps


class DAdaptAdaGrad(_GlobalDOptimizer):
    """dadaptation.DAdaptAdaGrad 3.2 (dense gradients): AdaGrad with the D-Adaptation step size.

    Defaults: lr=1.0, momentum=0, log_every=0, weight_decay=0, eps=1e-6, d0=1e-6, growth_rate=inf. As the
    reference, the first group's lr is used for every group.
    """

    reference_name = "DAdaptAdaGrad"

    def __init__(self, param_groups, lr=1.0, momentum=0.0, log_every=0, weight_decay=0.0, eps=1e-6, d0=1e-6,
                 growth_rate=float("inf")):
        _check_positive(d0=d0, lr=lr, eps=eps)
        if momentum < 0:
            raise ValueError(f"Momentum {momentum} must be non-negative")
        super().__init__(param_groups, lr, d0, lr_rule="first", lazy_init=True, log_every=log_every)
        self.momentum, self.weight_decay, self.eps = float(momentum), float(weight_decay), float(eps)
        self.growth_rate = float(growth_rate)
        self.gsq_weighted = _scalar("gsq_weighted", 0.0)
        self.sksq_weighted = _scalar("sksq_weighted", 0.0)
        self.skl1 = _scalar("skl1", 0.0)
        self.alphak = self._state("alphak", fill=1e-6)
        self.sk = self._state("sk")
        self.x0 = self._state("x0")

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        total = ops.addn(self._map(_dadapt_adagrad_pass1, (self.weight_decay, self.eps), (self._first(), dlr),
                                   (self.sk, self.alphak, self.x0, grads, self.parameters)))
        sksq_weighted = self.sksq_weighted + total[1]
        skl1 = self.skl1 + total[2]
        proceed = skl1 != 0
        gsq_weighted = self.gsq_weighted + dlr * dlr * total[0]
        d_hat = (sksq_weighted - gsq_weighted) / self._safe(proceed, skl1)
        new_d = ops.select(lr > 0, self._growth(d, d_hat), d)
        ck = 1.0 - self.momentum
        go = ops.cast(proceed, _F32)
        if self.momentum != 0:
            coefs = (ops.select(proceed, _const(1.0 - ck), _const(1.0)), go * ck)
        else:  # the reference copies z into p
            coefs = (1.0 - go, go)
        scale = self.hyper_map(ops.partial(_sqrt_plus, self.eps), self.alphak)
        results = self._map(_dadapt_x0_minus, (True,), coefs, (self.sk, self.x0, scale, self.parameters))
        return results + self._finish(proceed, new_d, ((self.gsq_weighted, gsq_weighted), (self.skl1, skl1),
                                                        (self.sksq_weighted, sksq_weighted)))


_dadapt_adan_pass1 = ops.MultitypeFuncGraph("dadapt_adan_pass1")


@_dadapt_adan_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_adan_pass1_update(opts, coefs, s, exp_avg, exp_avg_diff, exp_avg_sq, pre_grad, grad):
    """DAdaptAdan and DAdaptAdanIP (ip=True: the numerator is <g, s / denom> before the step)."""
    beta1, beta2, beta3, eps, ip = opts
    first_step, m_add, diff_add, s_add, dlr = coefs
    g = _f32(grad)
    grad_diff = g - _lazy(first_step, pre_grad, g)
    update = g + grad_diff * beta2
    if ip:  # before the assigns below: a Parameter read after its assign gives the new value
        numerator = _sum(g * (s / (ops.sqrt(exp_avg_sq) + eps))) * dlr
    else:
        numerator = dlr  # unused
    new_s = s * beta3 + g * s_add
    new_exp_avg_sq = exp_avg_sq * beta3 + update * update * (1.0 - beta3)
    updates = (ops.assign(exp_avg, exp_avg * beta1 + g * m_add),
               ops.assign(exp_avg_diff, exp_avg_diff * beta2 + grad_diff * diff_add),
               ops.assign(exp_avg_sq, new_exp_avg_sq), ops.assign(s, new_s))
    if ip:
        return _pack([numerator, _sum(ops.abs(new_s))], updates)
    denom = ops.sqrt(new_exp_avg_sq) + eps
    return _pack([_sum(g * g / denom), _sum(new_s * new_s / denom), _sum(ops.abs(new_s))], updates)


_dadapt_adan_pass2 = ops.MultitypeFuncGraph("dadapt_adan_pass2")


@_dadapt_adan_pass2.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_adan_pass2_update(opts, coefs, exp_avg, exp_avg_diff, exp_avg_sq, pre_grad, grad, param):
    beta2, eps, no_prox = opts
    go, decay_factor, keep_grad = coefs
    p = _f32(param)
    update = (exp_avg + exp_avg_diff * beta2) / (ops.sqrt(exp_avg_sq) + eps) * go
    if no_prox:
        p = p * decay_factor - update
    else:
        p = (p - update) / decay_factor
    return _write(param, p), ops.assign(pre_grad, _lazy(keep_grad, pre_grad, _f32(grad)))


class DAdaptAdan(_GlobalDOptimizer):
    """dadaptation.DAdaptAdan 3.2: Adan with the D-Adaptation step size.

    Defaults: lr=1.0, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False, log_every=0, d0=1e-6,
    growth_rate=inf. As the reference, the first group's lr is used for every group.
    """

    reference_name = "DAdaptAdan"
    _ip = False

    def __init__(self, param_groups, lr=1.0, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False,
                 log_every=0, d0=1e-6, growth_rate=float("inf")):
        _check_positive(d0=d0, lr=lr, eps=eps)
        _check_betas(betas, 3)
        super().__init__(param_groups, lr, d0, lr_rule="first", log_every=log_every)
        self.beta1, self.beta2, self.beta3 = (float(b) for b in betas)
        self.eps, self.weight_decay, self.no_prox = float(eps), float(weight_decay), bool(no_prox)
        self.growth_rate = float(growth_rate)
        # DAdaptAdan's d comes from gsq_weighted, DAdaptAdanIP's from numerator_weighted
        self.weighted = _scalar("numerator_weighted" if self._ip else "gsq_weighted", 0.0)
        self.s = self._state("s")
        self.exp_avg = self._state("exp_avg")
        self.exp_avg_diff = self._state("exp_avg_diff")
        self.exp_avg_sq = self._state("exp_avg_sq")
        self.pre_grad = self._state("pre_grad")

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        first_step = ops.cast(self.step_count == 0, _F32)  # the reference's state['step'] == 0: pre_grad = grad
        coefs = (first_step, dlr * (1.0 - b1), dlr * (1.0 - b2), dlr * (1.0 - b3), dlr)
        total = ops.addn(self._map(_dadapt_adan_pass1, (b1, b2, b3, self.eps, self._ip), coefs,
                                   (self.s, self.exp_avg, self.exp_avg_diff, self.exp_avg_sq, self.pre_grad, grads)))
        if self._ip:
            weighted = b3 * self.weighted + (1.0 - b3) * total[0]
            sk_l1 = total[1]
            proceed = sk_l1 != 0
            d_hat = 2.0 * (b3 / (1.0 - b3)) * weighted / self._safe(proceed, sk_l1)
        else:
            weighted = b3 * self.weighted + total[0] * dlr * dlr * (1.0 - b3)
            sk_l1 = total[2]
            proceed = sk_l1 != 0
            d_hat = (total[1] / (1.0 - b3) - weighted) / self._safe(proceed, sk_l1)
        new_d = ops.select(lr > 0, self._growth(d, d_hat), d)
        go = ops.cast(proceed, _F32)
        if self.no_prox:
            decay_factor = ops.select(proceed, 1.0 - dlr * self.weight_decay, _const(1.0))
        else:
            decay_factor = ops.select(proceed, 1.0 + dlr * self.weight_decay, _const(1.0))
        # pre_grad becomes this gradient when the step completes (and already is it in a first step)
        keep_grad = ops.maximum(go, first_step)
        results = self._map(_dadapt_adan_pass2, (b2, self.eps, self.no_prox), (go, decay_factor, keep_grad),
                            (self.exp_avg, self.exp_avg_diff, self.exp_avg_sq, self.pre_grad, grads, self.parameters))
        return results + self._finish(proceed, new_d, ((self.weighted, weighted),))


class DAdaptAdanIP(DAdaptAdan):
    """dadaptation.experimental.DAdaptAdanIP 3.2: DAdaptAdan with the inner-product d estimate (same options)."""

    reference_name = "DAdaptAdanIP"
    _ip = True


_dadapt_preprint_pass1 = ops.MultitypeFuncGraph("dadapt_preprint_pass1")


@_dadapt_preprint_pass1.register("Tuple", "Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _dadapt_preprint_pass1_update(opts, coefs, s, exp_avg, exp_avg_sq, grad, param):
    coupled_decay, eps = opts
    m_keep, m_add, v_keep, v_add, s_keep, s_add, active = coefs
    g = _grad(grad, param, coupled_decay)
    g_sq = g * g
    new_exp_avg_sq = exp_avg_sq * v_keep + g_sq * v_add
    denom = ops.sqrt(new_exp_avg_sq) + eps
    new_s = s * s_keep + g * s_add
    updates = (ops.assign(exp_avg, exp_avg * m_keep + g * m_add), ops.assign(exp_avg_sq, new_exp_avg_sq),
               ops.assign(s, new_s))
    return _pack([_sum(g_sq / denom) * active, _sum(new_s * new_s / denom) * active, _sum(ops.abs(new_s)) * active],
                 updates)


class DAdaptAdamPreprint(_GlobalDOptimizer):
    """dadaptation.experimental.DAdaptAdamPreprint 3.2 (Kohya's "DAdaptation"): the D-Adapt Adam of the preprint.

    Defaults: lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, log_every=0, decouple=False, d0=1e-6,
    growth_rate=inf, fsdp_in_use=False.
    """

    reference_name = "DAdaptAdamPreprint"

    def __init__(self, param_groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, log_every=0,
                 decouple=False, d0=1e-6, growth_rate=float("inf"), fsdp_in_use=False):
        _check_positive(d0=d0, lr=lr, eps=eps)
        _check_betas(betas)
        super().__init__(param_groups, lr, d0, lr_rule="max", log_every=log_every, fsdp_in_use=fsdp_in_use)
        if decouple:
            logger.info("DAdaptAdamPreprint: using decoupled weight decay")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay, self.decouple = float(eps), float(weight_decay), bool(decouple)
        self.growth_rate = float(growth_rate)
        self.gsq_weighted = _scalar("gsq_weighted", 0.0)
        self.s = self._state("s")
        self.exp_avg = self._state("exp_avg")
        self.exp_avg_sq = self._state("exp_avg_sq")

    def construct(self, grads):
        lr, d = self._lr(), self.d
        dlr = d * lr
        b1, b2 = self.beta1, self.beta2
        coupled = 0.0 if self.decouple else self.weight_decay
        sums = ()
        for i, (start, end) in enumerate(self.group_bounds):
            on, active = self._active(i)
            coefs = (self._keep(on, b1), active * dlr * (1.0 - b1), self._keep(on, b2), active * (1.0 - b2),
                     self._keep(on, b2), active * dlr * (1.0 - b2), active)
            sums += self._map(_dadapt_preprint_pass1, (coupled, self.eps), coefs,
                              (self.s, self.exp_avg, self.exp_avg_sq, grads, self.parameters), start, end)
        total = ops.addn(sums)
        gsq_weighted = b2 * self.gsq_weighted + total[0] * dlr * dlr * (1.0 - b2)
        proceed = total[2] != 0
        d_hat = (total[1] / (1.0 - b2) - gsq_weighted) / self._safe(proceed, total[2])
        new_d = self._growth(d, d_hat)
        go = ops.cast(proceed, _F32)
        decoupled = self.weight_decay if self.decouple else 0.0
        results = ()
        for i, (start, end) in enumerate(self.group_bounds):
            # decoupled weight decay only for groups whose lr is > 0 (unlike DAdaptAdam)
            coefs = (go, go * self._active(i)[1] * decoupled * dlr)
            results += self._map(_dadapt_adam_pass2, (decoupled, self.eps), coefs,
                                 (self.exp_avg, self.exp_avg_sq, self.parameters), start, end)
        return results + self._finish(proceed, new_d, ((self.gsq_weighted, gsq_weighted),))
