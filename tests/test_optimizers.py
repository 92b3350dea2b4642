"""Optimizers against numpy restatements of torch AdamW / SGD(nesterov) / lion_pytorch / transformers Adafactor,
prodigyopt 1.1.2 Prodigy, dadaptation 3.2 (DAdaptAdam, DAdaptLion, DAdaptSGD, DAdaptAdaGrad, DAdaptAdan,
DAdaptAdanIP, DAdaptAdamPreprint) and schedulefree 1.4 (AdamW/SGD/RAdam ScheduleFree)."""

import argparse
import contextlib

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindone.diffusers.training_utils import TrainStep

from library import optimizers as opt_lib
from library.optimizer_base import _log
from library.schedule_free import _radam_rect_graph, _radam_rectification

SHAPES = [(4, 3), (5,), (2, 3, 3, 3)]  # Linear weight, vector, conv weight
STEPS = 4


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"p{i}.weight") for i, s in enumerate(SHAPES)]


def make_grads(steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


class _OptimizerStep(nn.Cell):
    """What a TrainStep does with the optimizer: calls optimizer(grads) in its graph and ignores the result."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)  # parameter and state names stay as the optimizer made them
        self.optimizer = optimizer

    def construct(self, grads):
        self.optimizer(grads)
        return grads[0].sum()


_STEPS = {}


@contextlib.contextmanager
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)


def wrap(optimizer):
    if id(optimizer) not in _STEPS:
        _STEPS[id(optimizer)] = (optimizer, _OptimizerStep(optimizer))
    return _STEPS[id(optimizer)][1]


def step_once(optimizer, grads):
    """One step through the optimizer's compiled graph (GRAPH_MODE, as the trainer runs; compiled on first use).

    Not ms.jit(optimizer.construct): that graph keeps the values the lr Parameters had when it was compiled,
    and a Parameter.set_data after its first run detaches the parameter from it (measured, MS 2.10)."""
    with graph_mode():
        wrap(optimizer)(as_grads(grads))


def run(optimizer, grads_per_step):
    for grads in grads_per_step:
        step_once(optimizer, grads)
    return [p.asnumpy().copy() for p in optimizer.parameters]


def as_grads(grads):
    # mutable: the gradients are graph inputs, not constants (a constant tuple recompiles at every step)
    return ms.mutable(tuple(Tensor(g) for g in grads))


def two_groups(params, lrs=(1e-2, 3e-3)):
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


GROUP_OF = [0, 0, 1]


# ---- numpy references -------------------------------------------------------------------------


def np_adamw(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-8, wd=1e-2):
    ps = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            lr = lrs[step - 1][GROUP_OF[i]] if isinstance(lrs[0], (list, tuple)) else lrs[GROUP_OF[i]]
            ps[i] = ps[i] * (1 - lr * wd)
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
            ps[i] = ps[i] - lr / bc1 * m[i] / (np.sqrt(v[i]) / np.sqrt(bc2) + eps)
    return ps


def np_lion(params, grads_per_step, lrs, betas=(0.9, 0.99), wd=0.0):
    ps = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in ps]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            lr = lrs[GROUP_OF[i]]
            ps[i] = ps[i] * (1 - lr * wd) - lr * np.sign(betas[0] * m[i] + (1 - betas[0]) * g)
            m[i] = betas[1] * m[i] + (1 - betas[1]) * g
    return ps


def np_sgd_nesterov(params, grads_per_step, lrs, momentum=0.9, wd=0.0):
    ps = [p.astype(np.float64) for p in params]
    buf = [None] * len(ps)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            d = g + wd * ps[i]
            buf[i] = d.copy() if buf[i] is None else momentum * buf[i] + d
            ps[i] = ps[i] - lrs[GROUP_OF[i]] * (d + momentum * buf[i])
    return ps


def np_adafactor(params, grads_per_step, lrs=None, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8, beta1=None, wd=0.0,
                 scale_parameter=True, relative_step=True, warmup_init=False):
    ps = [p.astype(np.float64) for p in params]
    state = [{} for _ in ps]
    first_lrs = None
    rms = lambda x: np.sqrt(np.mean(x * x))
    for step, grads in enumerate(grads_per_step, start=1):
        first_lrs = {}
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            st = state[i]
            if relative_step:
                lr = min(1e-6 * step if warmup_init else 1e-2, 1.0 / np.sqrt(step))
            else:
                lr = lrs[GROUP_OF[i]]
            if scale_parameter:
                lr *= max(eps[1], rms(ps[i]))
            first_lrs.setdefault(GROUP_OF[i], lr)
            beta2t = 1.0 - step**decay
            upd = g * g + eps[0]
            if g.ndim >= 2:
                st["row"] = beta2t * st.get("row", 0) + (1 - beta2t) * upd.mean(-1)
                st["col"] = beta2t * st.get("col", 0) + (1 - beta2t) * upd.mean(-2)
                r = (st["row"] / st["row"].mean(-1, keepdims=True)) ** -0.5
                u = r[..., None] * st["col"][..., None, :] ** -0.5 * g
            else:
                st["v"] = beta2t * st.get("v", 0) + (1 - beta2t) * upd
                u = st["v"] ** -0.5 * g
            u = u / max(rms(u) / clip, 1.0) * lr
            if beta1 is not None:
                st["m"] = beta1 * st.get("m", 0) + (1 - beta1) * u
                u = st["m"]
            if wd:
                ps[i] = ps[i] - wd * lr * ps[i]
            ps[i] = ps[i] - u
    return ps, [first_lrs[k] for k in sorted(first_lrs)]


def assert_params(ours, ref, atol=1e-6):
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


# ---- update rules -----------------------------------------------------------------------------


def test_adamw_matches_torch_formula_per_group():
    params, grads = make_params(), make_grads()
    init = [p.asnumpy().copy() for p in params]
    optimizer = opt_lib.AdamW(two_groups(params), lr=1.0)
    ours = run(optimizer, grads)
    assert_params(ours, np_adamw(init, grads, (1e-2, 3e-3)))
    # a single shared lr would move group 1 differently: per-group lrs are really used
    assert not np.allclose(ours[2], np_adamw(init, grads, (1e-2, 1e-2))[2], atol=1e-5)
    assert int(optimizer.step_count.asnumpy()) == STEPS


def test_adamw_custom_hyperparameters():
    params, grads = make_params(), make_grads()
    init = [p.asnumpy().copy() for p in params]
    ours = run(opt_lib.AdamW(two_groups(params), lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1), grads)
    assert_params(ours, np_adamw(init, grads, (1e-2, 3e-3), betas=(0.8, 0.95), eps=1e-6, wd=0.1))


def test_lion_matches_reference():
    params, grads = make_params(), make_grads()
    init = [p.asnumpy().copy() for p in params]
    ours = run(opt_lib.Lion(two_groups(params), lr=1e-2, weight_decay=0.05), grads)
    assert_params(ours, np_lion(init, grads, (1e-2, 3e-3), wd=0.05))


def test_sgd_nesterov_matches_reference():
    params, grads = make_params(), make_grads()
    init = [p.asnumpy().copy() for p in params]
    ours = run(opt_lib.SGDNesterov(two_groups(params), lr=1e-2, weight_decay=1e-3), grads)
    assert_params(ours, np_sgd_nesterov(init, grads, (1e-2, 3e-3), wd=1e-3))
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        opt_lib.SGDNesterov(make_params(), lr=0.1, momentum=0.0)


def test_adafactor_relative_step_matches_transformers():
    params, grads = make_params(), make_grads(3)
    init = [p.asnumpy().copy() for p in params]
    optimizer = opt_lib.Adafactor([{"params": params[:2]}, {"params": params[2:]}])
    ours = run(optimizer, grads)
    ref, ref_lrs = np_adafactor(init, grads)
    assert_params(ours, ref)
    np.testing.assert_allclose(optimizer.get_last_lrs(), ref_lrs, rtol=1e-5)


def test_adafactor_manual_lr_first_moment_and_decay():
    params, grads = make_params(), make_grads(3)
    init = [p.asnumpy().copy() for p in params]
    kwargs = dict(beta1=0.9, weight_decay=0.1, scale_parameter=False, relative_step=False)
    ours = run(opt_lib.Adafactor(two_groups(params), lr=1.0, **kwargs), grads)
    ref, _ = np_adafactor(init, grads, lrs=(1e-2, 3e-3), beta1=0.9, wd=0.1, scale_parameter=False, relative_step=False)
    assert_params(ours, ref)
    with pytest.raises(ValueError, match="Cannot combine manual `lr`"):
        opt_lib.Adafactor(make_params(), lr=1e-3)


def test_lr_change_between_steps_uses_same_compiled_graph():
    params, grads = make_params(), make_grads(3)
    init = [p.asnumpy().copy() for p in params]
    optimizer = opt_lib.AdamW(two_groups(params), lr=1.0)
    schedule = [(1e-2, 3e-3), (5e-2, 0.0), (2e-3, 1e-2)]
    for lrs, g in zip(schedule, grads):
        optimizer.set_lr(lrs)
        step_once(optimizer, g)
    assert optimizer.get_lr() == pytest.approx([2e-3, 1e-2])
    assert_params([p.asnumpy() for p in params], np_adamw(init, grads, schedule))


def test_state_dict_round_trip_resumes_identically():
    grads = make_grads(4)
    full = opt_lib.AdamW(two_groups(make_params()), lr=1.0)
    expected = run(full, grads)

    first = opt_lib.AdamW(two_groups(make_params()), lr=1.0)
    run(first, grads[:2])
    state = first.state_dict()
    weights = [p.asnumpy().copy() for p in first.parameters]
    assert {"optimizer.step", "optimizer.group0.lr", "exp_avg.p0.weight", "exp_avg_sq.p2.weight"} <= set(state)

    params = make_params(seed=5)
    for p, w in zip(params, weights):
        p.set_data(Tensor(w))
    resumed = opt_lib.AdamW(two_groups(params, lrs=(9.0, 9.0)), lr=1.0)
    resumed.load_state_dict(state)
    assert resumed.get_lr() == pytest.approx([1e-2, 3e-3])
    assert_params(run(resumed, grads[2:]), expected, atol=1e-7)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "optimizer.step"})


class _LinearStep(TrainStep):
    def forward(self, x, y):
        loss = ((self.model(x) - y) ** 2).mean()
        return (self.scale_loss(loss),)


ONE_STEP_CASES = {
    "AdamW": (lambda groups: opt_lib.AdamW(groups, lr=1.0), lambda p, g: np_adamw(p, [g], (0.05,))),
    "Lion": (lambda groups: opt_lib.Lion(groups, lr=0.05), lambda p, g: np_lion(p, [g], (0.05,))),
    "SGDNesterov": (lambda groups: opt_lib.SGDNesterov(groups, lr=0.05), lambda p, g: np_sgd_nesterov(p, [g], (0.05,))),
    "Adafactor": (lambda groups: opt_lib.Adafactor([{"params": groups[0]["params"]}]), lambda p, g: np_adafactor(p, [g])[0]),
    # the new kinds of step: two passes tied by depend (Prodigy), parameter writes in the first pass (DAdaptLion),
    # schedule-free y/z updates
    "Prodigy": (lambda groups: opt_lib.Prodigy(groups, d0=0.1, weight_decay=0.1),
                lambda p, g: np_prodigy(p, [g], (0.05,), d0=0.1, weight_decay=0.1)[0]),
    "DAdaptLion": (lambda groups: opt_lib.DAdaptLion(groups, d0=0.1), lambda p, g: np_dadapt_lion(p, [g], (0.05,), d0=0.1)[0]),
    "AdamWScheduleFree": (lambda groups: trained(opt_lib.AdamWScheduleFree(groups)),
                          lambda p, g: np_schedule_free(p, [g], (0.05,))[0]),
}


def trained(optimizer):
    optimizer.train_mode()
    return optimizer


@pytest.mark.parametrize("name", list(ONE_STEP_CASES))
def test_inside_mindone_train_step_graph_mode(name):
    """TrainStep discards what optimizer(grads) returns: every parameter must still be updated."""
    build, reference = ONE_STEP_CASES[name]
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        rng = np.random.default_rng(3)
        model = nn.Dense(3, 1)
        w0 = rng.standard_normal((1, 3)).astype(np.float32)
        b0 = rng.standard_normal((1,)).astype(np.float32)
        model.weight.set_data(Tensor(w0))
        model.bias.set_data(Tensor(b0))
        optimizer = build([{"params": [model.weight, model.bias], "lr": 0.05}])
        step = _LinearStep(model, optimizer, gradient_accumulation_steps=1).set_train()
        x = rng.standard_normal((8, 3)).astype(np.float32)
        y = rng.standard_normal((8, 1)).astype(np.float32)
        step(Tensor(x), Tensor(y))
        residual = x @ w0.T + b0 - y
        grads = [2.0 / len(x) * residual.T @ x, 2.0 / len(x) * residual.sum(axis=0)]
        ref_w, ref_b = reference([w0, b0], grads)
        np.testing.assert_allclose(model.weight.asnumpy(), ref_w, atol=1e-6)
        np.testing.assert_allclose(model.bias.asnumpy(), ref_b, atol=1e-6)
        assert not np.allclose(model.bias.asnumpy(), b0)
    finally:
        ms.set_context(mode=mode)


# ---- factory and flags ------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser()
    opt_lib.add_optimizer_arguments(parser)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    return parser.parse_args(argv)


def test_defaults_and_warmup_type():
    args = parse([])
    assert (args.optimizer_type, args.learning_rate, args.max_grad_norm, args.lr_scheduler) == ("", 2e-6, 1.0, "constant")
    assert (args.lr_warmup_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power) == (0, 1, 1)
    assert parse(["--lr_warmup_steps", "0.1"]).lr_warmup_steps == 0.1
    assert parse(["--lr_warmup_steps", "10%"]).lr_warmup_steps == 0.1
    assert parse(["--lr_warmup_steps", "100"]).lr_warmup_steps == 100
    with pytest.raises(SystemExit):
        parse(["--lr_warmup_steps", "1.5"])


def test_get_optimizer_names_and_args():
    args = parse(["--optimizer_type", "adamw", "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", "--learning_rate", "1e-4"])
    name, arg_str, optimizer = opt_lib.get_optimizer(args, two_groups(make_params()))
    assert name == "torch.optim.adamw.AdamW" and arg_str == "weight_decay=0.1,betas=(0.9, 0.99)"
    assert isinstance(optimizer, opt_lib.AdamW) and optimizer.weight_decay == 0.1
    assert float(optimizer.beta2.asnumpy()) == pytest.approx(0.99)
    assert optimizer.get_lr() == pytest.approx([1e-2, 3e-3]) and optimizer.default_lr == 1e-4

    name, arg_str, optimizer = opt_lib.get_optimizer(parse(["--optimizer_type", "SGDNesterov"]), make_params())
    assert name == "torch.optim.sgd.SGD" and arg_str == "momentum=0.9"
    assert opt_lib.get_optimizer(parse(["--use_lion_optimizer"]), make_params())[0] == "lion_pytorch.lion_pytorch.Lion"
    name, _, optimizer = opt_lib.get_optimizer(parse(["--optimizer_type", "AdamW8bit"]), make_params())
    assert name == "torch.optim.adamw.AdamW" and isinstance(optimizer, opt_lib.AdamW)


def test_get_optimizer_adafactor_relative_step_takes_over_lr():
    args = parse(["--optimizer_type", "Adafactor", "--learning_rate", "1e-3"])
    args.unet_lr, args.text_encoder_lr = 1e-3, [1e-4]
    groups = two_groups(make_params())
    name, arg_str, optimizer = opt_lib.get_optimizer(args, groups)
    assert name == "transformers.optimization.Adafactor" and arg_str == "relative_step=True"
    assert args.lr_scheduler == "adafactor:0.001" and args.learning_rate is None
    assert args.unet_lr is None and args.text_encoder_lr is None and all("lr" not in g for g in groups)
    assert optimizer.relative_step

    args = parse(["--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                  "--learning_rate", "1e-3"])
    _, _, optimizer = opt_lib.get_optimizer(args, make_params())
    assert not optimizer.relative_step and optimizer.get_lr() == pytest.approx([1e-3]) and args.lr_scheduler == "constant"


@pytest.mark.parametrize("argv,message", [
    (["--optimizer_type", "DAdaptAdamW"], "no such D-Adaptation optimizer; use one of DAdaptation"),
    (["--optimizer_type", "ScheduleFreeWrapperScheduleFree"], "no such schedule-free optimizer"),
    (["--optimizer_type", "Prodigy", "--optimizer_args", "amsgrad=True"], r"\['amsgrad'\] not supported by Prodigy"),
    (["--optimizer_type", "SGDScheduleFree", "--optimizer_args", "betas=0.9,0.99"], r"\['betas'\] not supported"),
    (["--optimizer_type", "torch.optim.RAdam"], "not one of the optimizers"),
    (["--optimizer_args", "amsgrad=True"], r"\['amsgrad'\] not supported by AdamW"),
    (["--optimizer_args", "weight_decay"], "key=value"),
    (["--optimizer_args", "betas=(0.9,"], "not a Python literal"),
    (["--use_8bit_adam", "--use_lion_optimizer"], "both option"),
    (["--fused_backward_pass"], "only works with optimizer_type Adafactor"),
])
def test_get_optimizer_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        opt_lib.get_optimizer(parse(argv), make_params())


def test_bitsandbytes_fallback_warns_once_per_run(caplog):
    # the trainer checks the flags early (resolve_optimizer_type) and builds the optimizer later (get_optimizer):
    # the demo used to print the warning twice
    args = parse(["--optimizer_type", "AdamW8bit"])
    with caplog.at_level("WARNING", logger="library.optimizers"):
        assert opt_lib.resolve_optimizer_type(args) == "adamw"
        opt_lib.get_optimizer(args, make_params())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["--optimizer_type AdamW8bit: bitsandbytes is CUDA-only; using torch.optim.adamw.AdamW with "
                        "the same update rule and full-precision state"]


# ==== D-Adaptation / Prodigy / schedule-free ===================================================
#
# numpy float64 transcriptions of prodigyopt 1.1.2, dadaptation 3.2 and schedulefree 1.4 (their step() methods
# restated loop by loop). `lrs` is one lr per group for every step, or a list of those, one per step.


def correlated_grads(steps=4, seed=1):
    """Gradients with a persistent direction, so that the D-Adaptation estimates actually grow."""
    rng = np.random.default_rng(seed)
    base = [rng.standard_normal(s) for s in SHAPES]
    return [[(b + 0.5 * rng.standard_normal(b.shape)).astype(np.float32) for b in base] for _ in range(steps)]


def lrs_at(lrs, step):
    return lrs[step] if isinstance(lrs[0], (list, tuple)) else lrs


def f64(arrays):
    return [np.array(a, dtype=np.float64) for a in arrays]


def np_prodigy(params, grads_per_step, lrs, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
               use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=np.inf, slice_p=1):
    ps = f64(params)
    b1, b2 = betas
    b3 = np.sqrt(b2) if beta3 is None else beta3
    d, d_max, d_numerator, k, ds = d0, d0, 0.0, 0, []
    flat = lambda x: x.reshape(-1)[::slice_p]
    s = [np.zeros_like(flat(p)) for p in ps]
    p0 = [flat(p).copy() for p in ps]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    for step, grads in enumerate(grads_per_step):
        group_lrs = lrs_at(lrs, step)
        lr = max(group_lrs)
        bc = np.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if use_bias_correction else 1.0
        dlr = d * lr * bc
        gs = f64(grads)
        delta, denom = 0.0, 0.0
        for i, g in enumerate(gs):
            if weight_decay != 0 and not decouple:
                gs[i] = g = g + weight_decay * ps[i]
            if group_lrs[GROUP_OF[i]] > 0:
                delta += (d / d0) * dlr * np.dot(flat(g), p0[i] - flat(ps[i]))
                m[i] = b1 * m[i] + d * (1 - b1) * g
                v[i] = b2 * v[i] + d * d * (1 - b2) * g * g
                s[i] = b3 * s[i] + (d / d0) * (d if safeguard_warmup else dlr) * flat(g)
                denom += np.abs(s[i]).sum()
        if denom == 0:  # no progress: return before touching the parameters
            ds.append(d)
            continue
        numerator = d_numerator * b3 + delta
        d_hat = d_coef * numerator / denom
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)
        d_numerator = numerator
        for i, g in enumerate(gs):
            den = np.sqrt(v[i]) + d * eps
            if weight_decay != 0 and decouple:
                ps[i] = ps[i] - weight_decay * dlr * ps[i]
            ps[i] = ps[i] - (dlr * m[i] / den if b1 > 0 else dlr * d * g / den)
        k += 1
        ds.append(d)
    return ps, ds


def np_dadapt_adam(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decouple=False,
                   use_bias_correction=False, d0=1e-6, growth_rate=np.inf):
    ps = f64(params)
    b1, b2 = betas
    sb2 = np.sqrt(b2)
    d, nw, k, ds = d0, 0.0, 0, []
    s, m, v = ([np.zeros_like(p) for p in ps] for _ in range(3))
    for step, grads in enumerate(grads_per_step):
        group_lrs = lrs_at(lrs, step)
        lr = max(group_lrs)
        bc = np.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if use_bias_correction else 1.0
        dlr = d * lr * bc
        acc, l1 = 0.0, 0.0
        for i, g in enumerate(f64(grads)):
            if weight_decay != 0 and not decouple:
                g = g + weight_decay * ps[i]
            if group_lrs[GROUP_OF[i]] > 0:
                acc += dlr * np.dot(g.ravel(), (s[i] / (np.sqrt(v[i]) + eps)).ravel())
                m[i] = b1 * m[i] + dlr * (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                s[i] = sb2 * s[i] + dlr * (1 - sb2) * g
                l1 += np.abs(s[i]).sum()
        new_nw = sb2 * nw + (1 - sb2) * acc
        if l1 == 0:
            ds.append(d)
            continue
        d = max(d, min(new_nw / ((1 - sb2) * l1), d * growth_rate))
        nw = new_nw
        for i in range(len(ps)):
            if weight_decay != 0 and decouple:
                ps[i] = ps[i] - weight_decay * dlr * ps[i]
            ps[i] = ps[i] - m[i] / (np.sqrt(v[i]) + eps)
        k += 1
        ds.append(d)
    return ps, ds


def np_dadapt_lion(params, grads_per_step, lrs, betas=(0.9, 0.99), weight_decay=0.0, d0=1e-6):
    ps = f64(params)
    b1, b2 = betas
    sb2 = np.sqrt(b2)
    d, nw, ds = d0, 0.0, []
    m, s = [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps]
    for step, grads in enumerate(grads_per_step):
        lr = max(lrs_at(lrs, step))
        dlr = d * lr
        acc, l1 = 0.0, 0.0
        for i, g in enumerate(f64(grads)):  # every group, whatever its lr
            ps[i] = ps[i] * (1 - dlr * weight_decay)
            update = np.sign(b1 * m[i] + (1 - b1) * g)
            ps[i] = ps[i] - dlr * update
            m[i] = b2 * m[i] + (1 - b2) * dlr * g
            acc += dlr * np.dot(update.ravel(), s[i].ravel())
            s[i] = sb2 * s[i] + (1 - sb2) * dlr * update
            l1 += np.abs(s[i]).sum()
        new_nw = sb2 * nw + (1 - sb2) * acc
        if l1 != 0:
            if lr > 0:
                d = max(d, new_nw / ((1 - sb2) * l1))
            nw = new_nw
        ds.append(d)
    return ps, ds


def np_dadapt_sgd(params, grads_per_step, lrs, momentum=0.0, weight_decay=0.0, d0=1e-6, growth_rate=np.inf):
    ps = f64(params)
    x0 = [p.copy() for p in ps]
    s = [np.zeros_like(p) for p in ps]
    d, nw, k, g0_norm, ds = d0, 0.0, 0, None, []
    ck = 1 - momentum
    for step, grads in enumerate(grads_per_step):
        group_lrs = lrs_at(lrs, step)
        lr = max(group_lrs)
        gs = f64(grads)
        if k == 0:  # the first gradient's norm, without weight decay
            g0_norm = np.sqrt(sum((g * g).sum() for i, g in enumerate(gs) if group_lrs[GROUP_OF[i]] > 0))
        dlr = d * lr / g0_norm
        acc, sk_sq = 0.0, 0.0
        for i, g in enumerate(gs):
            if weight_decay != 0:
                g = g + weight_decay * ps[i]
            if group_lrs[GROUP_OF[i]] > 0:
                acc += dlr * np.dot(g.ravel(), s[i].ravel())
                s[i] = s[i] + dlr * g
                sk_sq += (s[i] * s[i]).sum()
        new_nw = nw + acc
        new_d = max(d, min(2 * new_nw / np.sqrt(sk_sq), d * growth_rate))
        if sk_sq == 0:
            ds.append(d)
            continue
        d, nw = new_d, new_nw
        for i in range(len(ps)):
            ps[i] = ps[i] * (1 - ck) + ck * (x0[i] - s[i])
        k += 1
        ds.append(d)
    return ps, ds


def np_dadapt_adagrad(params, grads_per_step, lrs, momentum=0.0, weight_decay=0.0, eps=1e-6, d0=1e-6,
                      growth_rate=np.inf):
    ps = f64(params)
    x0 = [p.copy() for p in ps]
    alphak = [np.full_like(p, 1e-6) for p in ps]
    sk = [np.zeros_like(p) for p in ps]
    d, gsq_w, sksq_w, skl1, ds = d0, 0.0, 0.0, 0.0, []
    ck = 1 - momentum
    for step, grads in enumerate(grads_per_step):
        lr = lrs_at(lrs, step)[0]  # the first group's
        dlr = d * lr
        g_sq, sksq_change, l1_change = 0.0, 0.0, 0.0
        for i, g in enumerate(f64(grads)):
            if weight_decay != 0:
                g = g + weight_decay * ps[i]
            old_sksq = (sk[i] * sk[i] / (np.sqrt(alphak[i]) + eps)).sum()
            old_l1 = np.abs(sk[i]).sum()
            alphak[i] = alphak[i] + g * g
            g_sq += (g * g / (np.sqrt(alphak[i]) + eps)).sum()
            sk[i] = sk[i] + dlr * g
            sksq_change += (sk[i] * sk[i] / (np.sqrt(alphak[i]) + eps)).sum() - old_sksq
            l1_change += np.abs(sk[i]).sum() - old_l1
        new_sksq_w, new_skl1 = sksq_w + sksq_change, skl1 + l1_change
        if new_skl1 == 0:
            ds.append(d)
            continue
        new_gsq_w = gsq_w + dlr * dlr * g_sq
        if lr > 0:
            d = max(d, min((new_sksq_w - new_gsq_w) / new_skl1, d * growth_rate))
        gsq_w, sksq_w, skl1 = new_gsq_w, new_sksq_w, new_skl1
        for i in range(len(ps)):
            z = x0[i] - sk[i] / (np.sqrt(alphak[i]) + eps)
            ps[i] = ps[i] * (1 - ck) + ck * z if momentum != 0 else z
        ds.append(d)
    return ps, ds


def np_dadapt_adan(params, grads_per_step, lrs, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, no_prox=False,
                   d0=1e-6, growth_rate=np.inf, ip=False):
    ps = f64(params)
    b1, b2, b3 = betas
    m, md, v, s = ([np.zeros_like(p) for p in ps] for _ in range(4))
    pre = [None] * len(ps)
    d, weighted, k, ds = d0, 0.0, 0, []
    for step, grads in enumerate(grads_per_step):
        lr = lrs_at(lrs, step)[0]  # the first group's
        dlr = d * lr
        gs = f64(grads)
        g_sq, sksq, l1, acc = 0.0, 0.0, 0.0, 0.0
        for i, g in enumerate(gs):
            if k == 0:
                pre[i] = g.copy()
            grad_diff = g - pre[i]
            update = g + b2 * grad_diff
            if ip:
                acc += dlr * np.dot(g.ravel(), (s[i] / (np.sqrt(v[i]) + eps)).ravel())
            m[i] = b1 * m[i] + dlr * (1 - b1) * g
            md[i] = b2 * md[i] + dlr * (1 - b2) * grad_diff
            v[i] = b3 * v[i] + (1 - b3) * update * update
            den = np.sqrt(v[i]) + eps
            g_sq += (g * g / den).sum()
            s[i] = b3 * s[i] + dlr * (1 - b3) * g
            sksq += (s[i] * s[i] / den).sum()
            l1 += np.abs(s[i]).sum()
        new_weighted = b3 * weighted + ((1 - b3) * acc if ip else g_sq * dlr**2 * (1 - b3))
        if l1 == 0:
            ds.append(d)
            continue
        if lr > 0:
            d_hat = 2 * (b3 / (1 - b3)) * new_weighted / l1 if ip else (sksq / (1 - b3) - new_weighted) / l1
            d = max(d, min(d_hat, d * growth_rate))
        weighted = new_weighted
        for i, g in enumerate(gs):
            upd = (m[i] + b2 * md[i]) / (np.sqrt(v[i]) + eps)
            if no_prox:
                ps[i] = ps[i] * (1 - dlr * weight_decay) - upd
            else:
                ps[i] = (ps[i] - upd) / (1 + dlr * weight_decay)
            pre[i] = g.copy()
        k += 1
        ds.append(d)
    return ps, ds


def np_dadapt_adam_preprint(params, grads_per_step, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            decouple=False, d0=1e-6, growth_rate=np.inf):
    ps = f64(params)
    b1, b2 = betas
    m, v, s = ([np.zeros_like(p) for p in ps] for _ in range(3))
    d, gsq_w, ds = d0, 0.0, []
    for step, grads in enumerate(grads_per_step):
        group_lrs = lrs_at(lrs, step)
        lr = max(group_lrs)
        dlr = d * lr
        g_sq, sksq, l1 = 0.0, 0.0, 0.0
        for i, g in enumerate(f64(grads)):
            if weight_decay != 0 and not decouple:
                g = g + weight_decay * ps[i]
            if group_lrs[GROUP_OF[i]] > 0:
                m[i] = b1 * m[i] + dlr * (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                den = np.sqrt(v[i]) + eps
                g_sq += (g * g / den).sum()
                s[i] = b2 * s[i] + dlr * (1 - b2) * g
                sksq += (s[i] * s[i] / den).sum()
                l1 += np.abs(s[i]).sum()
        new_gsq_w = b2 * gsq_w + g_sq * dlr**2 * (1 - b2)
        if l1 == 0:
            ds.append(d)
            continue
        d = max(d, min((sksq / (1 - b2) - new_gsq_w) / l1, d * growth_rate))
        gsq_w = new_gsq_w
        for i in range(len(ps)):
            if weight_decay != 0 and decouple and group_lrs[GROUP_OF[i]] > 0:
                ps[i] = ps[i] - weight_decay * dlr * ps[i]
            ps[i] = ps[i] - m[i] / (np.sqrt(v[i]) + eps)
        ds.append(d)
    return ps, ds


def np_schedule_free(params, grads_per_step, lrs, kind="adamw", betas=(0.9, 0.999), momentum=0.9, eps=1e-8,
                     weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0, silent_sgd_phase=True):
    """AdamWScheduleFree / SGDScheduleFree / RAdamScheduleFree.step; returns (y, x, scheduled lrs of the last step)."""
    ys = f64(params)
    z = [y.copy() for y in ys]
    v = [np.zeros_like(y) for y in ys]
    beta1 = momentum if kind == "sgd" else betas[0]
    beta2 = betas[1]
    n_groups = max(GROUP_OF[: len(ys)]) + 1
    lr_max, weight_sum = [-1.0] * n_groups, [0.0] * n_groups
    scheduled = [0.0] * n_groups
    for k, grads in enumerate(grads_per_step):
        group_lrs = lrs_at(lrs, k)
        adam = True
        if kind == "radam":
            step = k + 1
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
            adam = rho_t > 4.0
            rect = (np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) if adam
                    else float(not silent_sgd_phase))
        for gi in range(n_groups):
            if kind == "radam":
                lr = group_lrs[gi] * rect
            else:
                lr = group_lrs[gi] * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
            scheduled[gi] = lr
            lr_max[gi] = max(lr, lr_max[gi])
            weight = (k + 1) ** r * lr_max[gi] ** weight_lr_power
            weight_sum[gi] += weight
            ckp1 = weight / weight_sum[gi] if weight_sum[gi] != 0 else 0.0
            for i, g in enumerate(f64(grads)):
                if GROUP_OF[i] != gi:
                    continue
                if kind != "sgd":
                    v[i] = beta2 * v[i] + (1 - beta2) * g * g
                    if adam:
                        g = g / (np.sqrt(v[i] / (1 - beta2 ** (k + 1))) + eps)
                if weight_decay != 0:
                    g = g + weight_decay * ys[i]
                ys[i] = ys[i] + ckp1 * (z[i] - ys[i]) + lr * (beta1 * (1 - ckp1) - 1) * g
                z[i] = z[i] - lr * g
    xs = [y + (1 - 1 / beta1) * (zz - y) for y, zz in zip(ys, z)]
    return ys, xs, scheduled


# name, constructor, its kwargs, lrs (per group, or per step), numpy reference
ADAPTIVE_CASES = {
    "Prodigy": (opt_lib.Prodigy, dict(weight_decay=0.1, d0=1e-2), (1.0, 0.0), np_prodigy),
    "Prodigy-options": (
        opt_lib.Prodigy,
        dict(betas=(0.9, 0.99), beta3=0.9, weight_decay=0.05, decouple=False, use_bias_correction=True,
             safeguard_warmup=True, d0=1e-2, d_coef=3.0, growth_rate=1.5, slice_p=2, eps=1e-6),
        [(0.0, 0.0)] + [(0.7, 0.7)] * 5,  # a zero-lr first step (warmup) is skipped
        np_prodigy,
    ),
    "Prodigy-beta1-0": (opt_lib.Prodigy, dict(betas=(0.0, 0.999), d0=1e-2, weight_decay=0.01, decouple=False,
                                              growth_rate=2.0), (0.2, 0.2), np_prodigy),
    "DAdaptAdam": (opt_lib.DAdaptAdam, dict(weight_decay=0.1, decouple=True, d0=1e-2), (1.0, 0.0), np_dadapt_adam),
    "DAdaptAdam-options": (
        opt_lib.DAdaptAdam, dict(betas=(0.8, 0.99), weight_decay=0.05, use_bias_correction=True, d0=1e-2, growth_rate=1.5),
        [(0.0, 0.0)] + [(1.0, 1.0)] * 5, np_dadapt_adam,
    ),
    "DAdaptLion": (opt_lib.DAdaptLion, dict(weight_decay=0.1, d0=1e-2), (1.0, 0.0), np_dadapt_lion),
    "DAdaptSGD": (opt_lib.DAdaptSGD, dict(momentum=0.9, weight_decay=0.1, d0=1e-2, growth_rate=2.0), (1.0, 0.0), np_dadapt_sgd),
    "DAdaptAdaGrad": (opt_lib.DAdaptAdaGrad, dict(momentum=0.5, weight_decay=0.1, d0=1e-2), (1.0, 0.3), np_dadapt_adagrad),
    "DAdaptAdan": (opt_lib.DAdaptAdan, dict(weight_decay=0.1, d0=1e-2), (1.0, 0.3), np_dadapt_adan),
    "DAdaptAdan-no_prox": (opt_lib.DAdaptAdan, dict(weight_decay=0.1, no_prox=True, d0=1e-2, growth_rate=3.0), (1.0, 0.3),
                           np_dadapt_adan),
    "DAdaptAdanIP": (opt_lib.DAdaptAdanIP, dict(weight_decay=0.1, d0=1e-2), (1.0, 0.3),
                     lambda *a, **kw: np_dadapt_adan(*a, ip=True, **kw)),
    "DAdaptAdamPreprint": (opt_lib.DAdaptAdamPreprint, dict(weight_decay=0.1, decouple=True, d0=1e-2), (1.0, 0.0),
                           np_dadapt_adam_preprint),
}
SCHEDULE_FREE_CASES = {
    "AdamWScheduleFree": (opt_lib.AdamWScheduleFree, dict(weight_decay=0.1, warmup_steps=2, betas=(0.9, 0.99)),
                          (1e-2, 3e-3), dict(kind="adamw")),
    "AdamWScheduleFree-r": (opt_lib.AdamWScheduleFree, dict(r=0.5, weight_lr_power=1.0, eps=1e-6), (1e-2, 3e-3),
                            dict(kind="adamw")),
    "SGDScheduleFree": (opt_lib.SGDScheduleFree, dict(momentum=0.8, weight_decay=0.1, warmup_steps=3), (1e-2, 3e-3),
                        dict(kind="sgd")),
    # beta2 0.9: rho_t > 4 from step 5, so the run crosses from the SGD phase into the Adam phase
    "RAdamScheduleFree": (opt_lib.RAdamScheduleFree, dict(betas=(0.9, 0.9), weight_decay=0.1, silent_sgd_phase=False),
                          (1e-2, 3e-3), dict(kind="radam")),
    "RAdamScheduleFree-silent": (opt_lib.RAdamScheduleFree, dict(betas=(0.9, 0.9), weight_decay=0.1), (1e-2, 3e-3),
                                 dict(kind="radam")),
}
ADAPTIVE_STEPS, SPLIT = 6, 2


def run_steps(optimizer, grads_per_step, lrs, first_step=0):
    """Steps through one compiled graph, lrs set before each; returns the d after each step (if any)."""
    ds = []
    for n, grads in enumerate(grads_per_step, start=first_step):
        optimizer.set_lr(lrs_at(lrs, n))
        step_once(optimizer, grads)
        if optimizer.has_d_estimate:
            ds.append(optimizer.get_d())
    return ds


def restore(optimizer, state, weights):
    """Back to a saved point: the weights (as the network file has them) and the optimizer state."""
    for p, w in zip(optimizer.parameters, weights):
        p.set_data(Tensor(w))
    optimizer.load_state_dict(state)


def fresh_copy(optimizer_class, kwargs, lrs):
    """The same optimizer built anew on other parameters, as a resumed run builds it."""
    groups = two_groups(make_params(seed=5), lrs=lrs)
    optimizer = optimizer_class(groups, lr=1.0, **kwargs) if optimizer_class.has_d_estimate else optimizer_class(groups, **kwargs)
    wrap(optimizer)  # built into its train step before the state is loaded, as in the trainer
    return optimizer


@pytest.mark.parametrize("name", list(ADAPTIVE_CASES))
def test_adaptive_optimizer_matches_reference_and_resumes(name):
    """Prodigy / D-Adaptation: parameters and d over 6 steps against the numpy reference, 2 groups, weight decay;
    the state saved after step 2, loaded back, replays steps 3-6 bit-identically (all state is in the state dict)."""
    optimizer_class, kwargs, lrs, reference = ADAPTIVE_CASES[name]
    grads = correlated_grads(ADAPTIVE_STEPS)
    params = make_params()
    init = [p.asnumpy().copy() for p in params]
    optimizer = optimizer_class(two_groups(params, lrs=lrs_at(lrs, 0)), lr=1.0, **kwargs)
    ds = run_steps(optimizer, grads[:SPLIT], lrs)
    state, weights = optimizer.state_dict(), [p.asnumpy().copy() for p in params]
    ds += run_steps(optimizer, grads[SPLIT:], lrs, first_step=SPLIT)
    final = [p.asnumpy().copy() for p in params]

    ref_params, ref_ds = reference(init, grads, lrs, **kwargs)
    np.testing.assert_allclose(ds, ref_ds, rtol=2e-5)
    assert ds[-1] > kwargs["d0"]  # the estimate moved
    for ours, ref, start in zip(final, ref_params, init):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref - start).max()))
    assert optimizer.get_d_lrs() == pytest.approx([ds[-1] * lr for lr in lrs_at(lrs, ADAPTIVE_STEPS - 1)])

    restore(optimizer, state, weights)
    assert run_steps(optimizer, grads[SPLIT:], lrs, first_step=SPLIT) == ds[SPLIT:]
    for a, b in zip(params, final):
        np.testing.assert_array_equal(a.asnumpy(), b)
    assert set(fresh_copy(optimizer_class, kwargs, lrs_at(lrs, 0)).state_dict()) == set(state)


@pytest.mark.parametrize("name", list(SCHEDULE_FREE_CASES))
def test_schedule_free_matches_reference_and_resumes(name):
    """Schedule-free: y (train weights) and x (eval weights) against the numpy reference; a state saved in eval
    mode (as upstream saves), loaded back, replays the later steps bit-identically once train_mode() restores y."""
    optimizer_class, kwargs, lrs, ref_kwargs = SCHEDULE_FREE_CASES[name]
    grads = correlated_grads(ADAPTIVE_STEPS + 1)
    params = make_params()
    init = [p.asnumpy().copy() for p in params]
    optimizer = optimizer_class(two_groups(params, lrs=lrs), **kwargs)
    optimizer.train_mode()
    run_steps(optimizer, grads[:SPLIT], lrs)
    optimizer.eval_mode()
    state, weights = optimizer.state_dict(), [p.asnumpy().copy() for p in params]
    optimizer.train_mode()
    run_steps(optimizer, grads[SPLIT:], lrs, first_step=SPLIT)

    ref_y, ref_x, ref_scheduled = np_schedule_free(init, grads, lrs, **ref_kwargs, **kwargs)
    assert_params([p.asnumpy() for p in params], ref_y, atol=2e-6)
    np.testing.assert_allclose(optimizer.get_scheduled_lrs(), ref_scheduled, rtol=1e-5)
    y = [p.asnumpy().copy() for p in params]
    optimizer.eval_mode()
    assert not optimizer.is_train_mode
    assert_params([p.asnumpy() for p in params], ref_x, atol=2e-6)
    optimizer.train_mode()
    for a, b in zip(params, y):
        np.testing.assert_array_equal(a.asnumpy(), b)

    restore(optimizer, state, weights)
    assert not optimizer.is_train_mode  # the mode is part of the state
    with pytest.raises(RuntimeError, match="eval mode"):
        optimizer.check_train_mode()
    optimizer.train_mode()
    optimizer.check_train_mode()
    run_steps(optimizer, grads[SPLIT:], lrs, first_step=SPLIT)
    for a, b in zip(params, y):
        np.testing.assert_array_equal(a.asnumpy(), b)


@pytest.mark.parametrize("name", ["Prodigy-options", "DAdaptAdan", "AdamWScheduleFree"])
def test_state_loads_into_a_fresh_optimizer_and_continues_identically(name):
    """--save_state / --resume: a new optimizer (new parameters) given the saved weights and state takes the
    same next steps as the run that was not interrupted (Prodigy's p0 and warmup skip, Adan's previous gradient,
    a schedule-free state saved in eval mode)."""
    optimizer_class, kwargs, lrs, _ = {**ADAPTIVE_CASES, **SCHEDULE_FREE_CASES}[name]
    grads = correlated_grads(SPLIT + 2)
    optimizer = optimizer_class(two_groups(make_params(), lrs=lrs_at(lrs, 0)), lr=1.0, **kwargs)
    train_fn, eval_fn = opt_lib.get_optimizer_train_eval_fn(optimizer)  # no-ops unless schedule-free
    train_fn()
    run_steps(optimizer, grads[:SPLIT], lrs)
    eval_fn()
    state, weights = optimizer.state_dict(), [p.asnumpy().copy() for p in optimizer.parameters]
    train_fn()
    expected = run_steps(optimizer, grads[SPLIT:], lrs, first_step=SPLIT)

    resumed = fresh_copy(optimizer_class, kwargs, (0.5, 0.5))
    restore(resumed, state, weights)
    assert resumed.get_lr() == pytest.approx(optimizer.get_lr())
    opt_lib.get_optimizer_train_eval_fn(resumed)[0]()
    assert run_steps(resumed, grads[SPLIT:], lrs, first_step=SPLIT) == expected
    for a, b in zip(resumed.parameters, optimizer.parameters):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_schedule_free_modes_before_the_first_step_and_round_trip():
    params = make_params()
    init = [p.asnumpy().copy() for p in params]
    optimizer = opt_lib.AdamWScheduleFree(two_groups(params, lrs=(1e-2, 1e-2)))
    assert optimizer.is_schedule_free and not optimizer.is_train_mode  # as upstream: eval mode until train()
    optimizer.eval_mode()
    optimizer.train_mode()  # no z yet: the weights are left alone
    assert_params([p.asnumpy() for p in params], init, atol=0)
    run(optimizer, correlated_grads(3))
    y = [p.asnumpy().copy() for p in params]
    for _ in range(3):  # repeated switches neither drift nor stack
        optimizer.eval_mode()
        optimizer.eval_mode()
        x = [p.asnumpy().copy() for p in params]
        optimizer.train_mode()
        optimizer.train_mode()
        for a, b in zip(params, y):
            np.testing.assert_array_equal(a.asnumpy(), b)
    z = [t.asnumpy() for t in optimizer.z]
    assert_params(x, [b + (1 - 1 / 0.9) * (zz - b) for b, zz in zip(y, z)], atol=1e-6)
    assert not np.allclose(x[0], y[0])


def test_radam_rectification_past_the_table_in_float32():
    """After the float64 table, the float32 rectification agrees with the reference's float64 value."""
    for beta2 in (0.999, 0.99):
        optimizer = opt_lib.RAdamScheduleFree(make_params(), betas=(0.9, beta2))
        steps = np.array([optimizer.table_steps + 1, 3 * optimizer.table_steps, 10**6], dtype=np.float64)
        ours = _radam_rect_graph(Tensor(steps.astype(np.float32)), _log(beta2), beta2).asnumpy()
        rect, adam = _radam_rectification(steps, beta2)
        assert adam.all()
        np.testing.assert_allclose(ours, rect, rtol=1e-6)


def test_adaptive_optimizers_reject_unsupported_group_lrs():
    with pytest.raises(ValueError, match="same lr, or 0"):
        opt_lib.Prodigy(two_groups(make_params(), lrs=(1.0, 0.5)))
    optimizer = opt_lib.DAdaptAdam(two_groups(make_params(), lrs=(1.0, 1.0)))
    with pytest.raises(ValueError, match="same lr, or 0"):
        optimizer.set_lr([1.0, 0.5])
    optimizer.set_lr([0.5, 0.0])
    assert optimizer.get_d_lrs() == pytest.approx([0.5e-6, 0.0])
    with pytest.raises(ValueError, match="Invalid d0"):
        opt_lib.Prodigy(make_params(), d0=0.0)
    with pytest.raises(ValueError, match="Momentum must be between 0 and 1"):
        opt_lib.SGDScheduleFree(make_params(), momentum=1.0)


NEW_OPTIMIZER_NAMES = [  # --optimizer_type (any case), ss_optimizer name, class
    ("Prodigy", "prodigyopt.prodigy.Prodigy", opt_lib.Prodigy),
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", opt_lib.DAdaptAdamPreprint),
    ("dadaptadampreprint", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint", opt_lib.DAdaptAdamPreprint),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad", opt_lib.DAdaptAdaGrad),
    ("DADAPTADAM", "dadaptation.dadapt_adam.DAdaptAdam", opt_lib.DAdaptAdam),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan", opt_lib.DAdaptAdan),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP", opt_lib.DAdaptAdanIP),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion", opt_lib.DAdaptLion),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD", opt_lib.DAdaptSGD),
    ("AdamWScheduleFree", "schedulefree.adamw_schedulefree.AdamWScheduleFree", opt_lib.AdamWScheduleFree),
    ("sgdschedulefree", "schedulefree.sgd_schedulefree.SGDScheduleFree", opt_lib.SGDScheduleFree),
    ("RAdamScheduleFree", "schedulefree.radam_schedulefree.RAdamScheduleFree", opt_lib.RAdamScheduleFree),
]


@pytest.mark.parametrize("optimizer_type,name,cls", NEW_OPTIMIZER_NAMES)
def test_get_optimizer_new_names(optimizer_type, name, cls):
    args = parse(["--optimizer_type", optimizer_type, "--learning_rate", "1.0"])
    assert opt_lib.resolve_optimizer_type(args) in opt_lib.OPTIMIZER_NAMES
    got_name, arg_str, optimizer = opt_lib.get_optimizer(args, two_groups(make_params(), lrs=(1.0, 1.0)))
    assert (got_name, arg_str, type(optimizer)) == (name, "", cls)
    assert opt_lib.is_schedulefree_optimizer(optimizer) == name.startswith("schedulefree.")
    assert opt_lib.is_schedule_free_type(args) == name.startswith("schedulefree.")
    if opt_lib.is_schedulefree_optimizer(optimizer):
        assert optimizer.is_train_mode  # get_optimizer puts it in train mode, as upstream


def test_get_optimizer_passes_the_reference_options():
    args = parse(["--optimizer_type", "Prodigy", "--learning_rate", "1.0", "--optimizer_args", "d_coef=2.0",
                  "betas=0.9,0.99", "decouple=False", "use_bias_correction=True", "safeguard_warmup=True",
                  "weight_decay=0.01", "slice_p=11", "fsdp_in_use=False", "foreach=True"])
    name, arg_str, optimizer = opt_lib.get_optimizer(args, make_params())
    assert arg_str == ("d_coef=2.0,betas=(0.9, 0.99),decouple=False,use_bias_correction=True,safeguard_warmup=True,"
                       "weight_decay=0.01,slice_p=11,fsdp_in_use=False,foreach=True")
    assert (optimizer.d_coef, optimizer.beta2, optimizer.decouple, optimizer.slice_p) == (2.0, 0.99, False, 11)
    assert optimizer.s[2].shape == (-(-54 // 11),)  # every 11th entry of the 2x3x3x3 tensor feeds d
    args = parse(["--optimizer_type", "AdamWScheduleFree", "--learning_rate", "1e-3", "--optimizer_args",
                  "warmup_steps=100", "weight_decay=0.01", "betas=0.95,0.999"])
    _, _, optimizer = opt_lib.get_optimizer(args, make_params())
    assert (optimizer.warmup_steps, optimizer.weight_decay, optimizer.beta1) == (100, 0.01, 0.95)
    assert optimizer.get_lr() == pytest.approx([1e-3])


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_d_adaptation_lr_warnings(caplog):
    with caplog.at_level("WARNING", logger="library.optimizers"):
        opt_lib.get_optimizer(parse(["--optimizer_type", "Prodigy", "--learning_rate", "1e-4"]), make_params())
    assert warnings_of(caplog) == [
        "learning rate is too low for D-Adaptation/Prodigy (lr=0.0001): it scales the step size they estimate; "
        "use a learning rate around 1.0",
        "recommended: --learning_rate 1.0",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="library.optimizers"):  # the first group's lr is what is checked
        opt_lib.get_optimizer(parse(["--optimizer_type", "DAdaptAdam", "--learning_rate", "1e-4"]),
                              two_groups(make_params(), lrs=(1.0, 0.0)))
        opt_lib.get_optimizer(parse(["--optimizer_type", "AdamW", "--learning_rate", "1e-4"]), make_params())
    assert warnings_of(caplog) == ["several learning rates given to D-Adaptation/Prodigy ([0.0, 1.0]): Prodigy, "
                                   "DAdaptAdam, DAdaptLion, DAdaptSGD and DAdaptAdamPreprint only accept groups with "
                                   "the same lr or 0; DAdaptAdaGrad, DAdaptAdan and DAdaptAdanIP use the first "
                                   "group's lr for all"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="library.optimizers"):
        opt_lib.get_optimizer(parse(["--optimizer_type", "DAdaptAdan", "--learning_rate", "1.0"]),
                              two_groups(make_params(), lrs=(1.0, 0.5)))
    assert warnings_of(caplog)[-1] == ("DAdaptAdan uses the first parameter group's lr (1.0) for all groups: the "
                                       "other groups' lrs [0.5] have no effect")
    with pytest.raises(ValueError, match="different learning rates are only supported when the others are 0"):
        opt_lib.get_optimizer(parse(["--optimizer_type", "Prodigy", "--learning_rate", "1.0"]),
                              two_groups(make_params(), lrs=(1.0, 0.5)))


def test_d_lr_logs_per_group():
    _, _, optimizer = opt_lib.get_optimizer(parse(["--optimizer_type", "Prodigy", "--learning_rate", "1.0"]),
                                            two_groups(make_params(), lrs=(1.0, 0.0)))
    optimizer.d.set_data(Tensor(0.25, ms.float32))
    optimizer.set_lr([0.5, 0.0])
    assert opt_lib.d_lr_logs(optimizer, ["textencoder", "unet"]) == {"lr/d*lr/textencoder": 0.125, "lr/d*lr/unet": 0.0}
    assert opt_lib.d_lr_logs(optimizer, []) == {"lr/d*lr/group0": 0.125, "lr/d*lr/group1": 0.0}
    assert opt_lib.d_lr_logs(opt_lib.AdamW(make_params(), lr=1e-3), ["unet"]) == {}


def test_schedule_free_uses_no_lr_scheduler(caplog):
    args = parse(["--optimizer_type", "RAdamScheduleFree", "--learning_rate", "1e-3", "--lr_scheduler", "cosine",
                  "--lr_warmup_steps", "10"])
    with caplog.at_level("WARNING", logger="library.optimizers"):
        _, _, optimizer = opt_lib.get_optimizer(args, two_groups(make_params(), lrs=(1e-3, 5e-4)))
    assert warnings_of(caplog) == ["schedule-free optimizers use no LR scheduler: --lr_scheduler cosine and "
                                   "--lr_warmup_steps 10 are ignored (warmup: --optimizer_args warmup_steps=N)"]
    scheduler = opt_lib.get_dummy_scheduler(optimizer)
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([1e-3, 5e-4]) and scheduler.state_dict() == {}
    scheduler.load_state_dict({})
    train_fn, eval_fn = opt_lib.get_optimizer_train_eval_fn(optimizer)
    eval_fn()
    assert not optimizer.is_train_mode
    train_fn()
    assert optimizer.is_train_mode
    adamw = opt_lib.AdamW(make_params(), lr=1e-3)
    assert not opt_lib.is_schedulefree_optimizer(adamw)
    assert [f() for f in opt_lib.get_optimizer_train_eval_fn(adamw)] == [None, None]
