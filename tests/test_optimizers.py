"""Optimizers against numpy restatements of torch AdamW / SGD(nesterov) / lion_pytorch / transformers Adafactor."""

import argparse

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindone.diffusers.training_utils import TrainStep

from library import optimizers as opt_lib

SHAPES = [(4, 3), (5,), (2, 3, 3, 3)]  # Linear weight, vector, conv weight
STEPS = 4


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"p{i}.weight") for i, s in enumerate(SHAPES)]


def make_grads(steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def run(optimizer, grads_per_step):
    """Every step through one graph-compiled function (ms.jit), like a TrainStep would."""
    step = ms.jit(optimizer.construct)
    for grads in grads_per_step:
        step(tuple(Tensor(g) for g in grads))
    return [p.asnumpy().copy() for p in optimizer.parameters]


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
    step = ms.jit(optimizer.construct)
    schedule = [(1e-2, 3e-3), (5e-2, 0.0), (2e-3, 1e-2)]
    for lrs, g in zip(schedule, grads):
        optimizer.set_lr(lrs)
        step(tuple(Tensor(x) for x in g))
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
}


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
    (["--optimizer_type", "DAdaptAdam"], "D-Adaptation/Prodigy"),
    (["--optimizer_type", "Prodigy"], "use AdamW"),
    (["--optimizer_type", "AdamWScheduleFree"], "schedule-free"),
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
