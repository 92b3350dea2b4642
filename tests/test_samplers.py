"""library/samplers.py and library/sample_images.py: each sampler's update rule against numpy, upstream's scheduler
settings, every sampler on the tiny model, seeded (and isolated) noise, and the sample files the trainer writes.

The update-rule tests drive `sample_latents` with a fake model (eps = 0.3 x + t/1000 * P, P fixed) and compare the
model inputs of the first calls (the latents after each step, scaled as the sampler scales them) with the same
steps computed in float64 numpy from the papers' formulas, not from the schedulers' code. The tiny-model tests run
eagerly at 64x64 with 2 steps (pndm: 4), sharing one pipeline; one test runs the trainer's graph mode.
"""

import os
import random
import re

import mindspore as ms
import numpy as np
import pytest
from mindone.diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from mindspore import ops
from PIL import Image

import sdxl_minimal_inference as smi
from library import sample_images as si
from library import samplers
from library.sample_prompts import parse_prompt_line
from test_minimal_inference import ckpt, eager_context, pipeline  # noqa: F401  (fixtures: the same tiny pipeline)

T = 1000
BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=np.float64) ** 2
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
TRAIN_SIGMAS = np.sqrt((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)  # x_t / sqrt(abar) = x_0 + sigma * eps
SHAPE = (1, 4, 8, 8)
PATTERN = np.random.default_rng(42).standard_normal(SHAPE)


def fake_eps(x, t):
    return 0.3 * x + (t / 1000.0) * PATTERN


def run_sampler(name, steps, seed):
    """The model calls of `sample_latents` with the fake model: [(t, model input)], and the final latents."""
    calls = []

    def predict_noise(x, t):
        x, t = x.asnumpy().astype(np.float64), float(t.asnumpy())
        calls.append((t, x))
        return ms.Tensor(fake_eps(x, t).astype(np.float32))

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    latents = samplers.sample_latents(name, predict_noise, noise, steps, rng, progress=False)
    return calls, latents.asnumpy()


def start(seed):
    """The same draws as the pipeline: the initial noise, then the generator that continues for ancestral noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE, dtype=np.float32).astype(np.float64), rng


def linspace_sigmas(steps):
    timesteps = np.linspace(0, T - 1, steps)[::-1]
    return timesteps, np.append(np.interp(timesteps, np.arange(T), TRAIN_SIGMAS), 0.0)


def sigma_to_t(sigma):
    """The timestep of a sigma, linear in log sigma between the training timesteps."""
    return np.interp(np.log(sigma), np.log(TRAIN_SIGMAS), np.arange(T))


def k_input(x, sigma):
    return x / np.sqrt(sigma ** 2 + 1)  # the variance-preserving input an eps model was trained on


# ------------------------------------------------------------------------------------------------ numpy references

def ref_euler(steps, seed, ancestral=False):
    ts, s = linspace_sigmas(steps)
    x, rng = start(seed)
    x = x * s[0]
    out = []
    for i in range(steps):
        out.append((ts[i], k_input(x, s[i])))
        eps = fake_eps(k_input(x, s[i]), ts[i])
        if ancestral:  # to sigma_down deterministically, then fresh noise of std sigma_up: down^2 + up^2 = next^2
            up = np.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
            down = np.sqrt(s[i + 1] ** 2 - up ** 2)
            x = x + (down - s[i]) * eps + rng.standard_normal(SHAPE).astype(np.float32) * up
        else:
            x = x + (s[i + 1] - s[i]) * eps
    return out


def ref_lms(steps, seed):
    """Linear multistep in sigma: integrate the Lagrange polynomial through the last derivatives (order <= 4)."""
    ts, s = linspace_sigmas(steps)
    x, _ = start(seed)
    x = x * s[0]
    out, derivatives = [], []
    for i in range(steps):
        out.append((ts[i], k_input(x, s[i])))
        derivatives.append(fake_eps(k_input(x, s[i]), ts[i]))  # dx/dsigma = eps
        order = min(i + 1, 4)
        update = 0.0
        for j in range(order):  # j: derivative at sigma_(i-j)
            nodes = [s[i - k] for k in range(order) if k != j]
            basis = np.poly1d([1.0])
            for node in nodes:
                basis *= np.poly1d([1.0, -node]) / (s[i - j] - node)
            integral = np.polyint(basis)
            update = update + (integral(s[i + 1]) - integral(s[i])) * derivatives[i - j]
        x = x + update
    return out


def ref_heun(steps, seed):
    """Heun's method in sigma, with the predicted x0 clipped to [-1, 1] (upstream forces clip_sample)."""
    ts, s = linspace_sigmas(steps)
    x, _ = start(seed)
    x = x * s[0]
    out = []

    def derivative(x, sigma, t):
        out.append((t, k_input(x, sigma)))
        x0 = np.clip(x - sigma * fake_eps(k_input(x, sigma), t), -1, 1)
        return (x - x0) / sigma

    for i in range(steps):
        d = derivative(x, s[i], ts[i])
        if s[i + 1] == 0:
            x = x + (s[i + 1] - s[i]) * d  # the last step is Euler's
            continue
        d2 = derivative(x + (s[i + 1] - s[i]) * d, s[i + 1], ts[i + 1])
        x = x + (s[i + 1] - s[i]) * (d + d2) / 2
    return out


def ref_dpm2(steps, seed, ancestral=False):
    """DPM-Solver-2: the derivative at the log-midpoint of each step (ancestral: of sigma and sigma_down)."""
    ts, s = linspace_sigmas(steps)
    x, rng = start(seed)
    x = x * s[0]
    out = []
    for i in range(steps):
        out.append((ts[i], k_input(x, s[i])))
        eps = fake_eps(k_input(x, s[i]), ts[i])
        if ancestral:
            up = np.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
            target = np.sqrt(s[i + 1] ** 2 - up ** 2)
        else:
            up, target = 0.0, s[i + 1]
        if target == 0:
            x = x + (target - s[i]) * eps  # the last step is Euler's
            continue
        mid = np.sqrt(s[i] * target)
        x_mid = x + (mid - s[i]) * eps
        out.append((sigma_to_t(mid), k_input(x_mid, mid)))
        eps_mid = fake_eps(k_input(x_mid, mid), sigma_to_t(mid))
        x = x + (target - s[i]) * eps_mid
        if ancestral:
            x = x + rng.standard_normal(SHAPE).astype(np.float32) * up
    return out


def ref_ddim(steps, seed):
    """Deterministic DDIM (eta 0) on 'leading' timesteps, x0 clipped to [-1, 1], alpha_bar 1 past the end."""
    ratio = T // steps
    ts = np.arange(steps)[::-1] * ratio
    x, _ = start(seed)
    out = []
    for t in ts:
        out.append((t, x))
        eps = fake_eps(x, t)
        a, a_prev = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD[t - ratio] if t - ratio >= 0 else 1.0
        x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return out


def pndm_transfer(x, eps, t, t_prev):
    """PNDM's transfer from t to t_prev (its eq. 9) for a given eps."""
    a, a_prev = ALPHAS_CUMPROD[t], ALPHAS_CUMPROD[t_prev]
    return np.sqrt(a_prev / a) * x - (a_prev - a) * eps / (a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev))


def ref_pndm_first_rk_step(steps, seed):
    """The first pseudo Runge-Kutta step (4 model calls), from the largest 'leading' timestep to the next."""
    ratio = T // steps
    t0 = (steps - 1) * ratio
    t_half, t1 = t0 - ratio // 2, t0 - ratio
    x, _ = start(seed)
    k1 = fake_eps(x, t0)
    x_a = pndm_transfer(x, k1, t0, t_half)
    k2 = fake_eps(x_a, t_half)
    x_b = pndm_transfer(x, k2, t0, t_half)
    k3 = fake_eps(x_b, t_half)
    x_c = pndm_transfer(x, k3, t0, t1)
    k4 = fake_eps(x_c, t1)
    x1 = pndm_transfer(x, (k1 + 2 * k2 + 2 * k3 + k4) / 6, t0, t1)
    return [(t0, x), (t_half, x_a), (t_half, x_b), (t1, x_c), (t1, x1)]


def ref_dpmsolver(steps, seed, plus_plus):
    """DPM-Solver(++) 2M with the midpoint rule, first order at the first step, in the VP parametrization."""
    ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    s = np.interp(ts, np.arange(T), TRAIN_SIGMAS)
    alpha, sigma = 1 / np.sqrt(s ** 2 + 1), s / np.sqrt(s ** 2 + 1)
    lam = np.log(alpha) - np.log(sigma)
    x, _ = start(seed)
    out, outputs = [], []
    for i in range(2):
        out.append((ts[i], x))
        eps = fake_eps(x, ts[i])
        outputs.append((x - sigma[i] * eps) / alpha[i] if plus_plus else eps)  # the x0 or eps the solver extrapolates
        h = lam[i + 1] - lam[i]
        if i == 0:
            d = outputs[0]
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = outputs[1] + 0.5 * (outputs[1] - outputs[0]) / r
        if plus_plus:
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d
        else:
            x = alpha[i + 1] / alpha[i] * x - sigma[i + 1] * (np.exp(h) - 1) * d
    out.append((ts[2], x))
    return out


REFERENCES = {
    "euler": lambda n, seed: ref_euler(n, seed),
    "euler_a": lambda n, seed: ref_euler(n, seed, ancestral=True),
    "lms": ref_lms,
    "heun": ref_heun,
    "dpm_2": lambda n, seed: ref_dpm2(n, seed),
    "dpm_2_a": lambda n, seed: ref_dpm2(n, seed, ancestral=True),
    "ddim": ref_ddim,
    "pndm": ref_pndm_first_rk_step,
    "dpmsolver++": lambda n, seed: ref_dpmsolver(n, seed, plus_plus=True),
    "dpmsolver": lambda n, seed: ref_dpmsolver(n, seed, plus_plus=False),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_first_steps_follow_the_update_rule(name):
    steps, seed = 5, 3
    calls, latents = run_sampler(name, steps, seed)
    expected = REFERENCES[name](steps, seed)[:5]
    assert len(calls) >= len(expected)
    for i, ((t, x), (t_ref, x_ref)) in enumerate(zip(calls, expected)):
        assert t == pytest.approx(t_ref, abs=2e-3), f"call {i}: timestep"
        np.testing.assert_allclose(x, x_ref, rtol=2e-4, atol=2e-4, err_msg=f"call {i}: model input")
    assert np.isfinite(latents).all()


@pytest.mark.parametrize("name, calls", [("euler", 5), ("euler_a", 5), ("ddim", 5), ("lms", 5), ("dpmsolver", 5),
                                         ("dpmsolver++", 5), ("dpmsingle", 5), ("heun", 9), ("dpm_2", 9),
                                         ("dpm_2_a", 9), ("pndm", 14)])
def test_model_calls_per_sampler(name, calls):
    """Second-order samplers call the model twice a step but once for the last, PNDM adds 9 warm-up calls."""
    assert len(run_sampler(name, 5, 0)[0]) == calls


def test_the_full_heun_and_dpm_2_runs_match_numpy_to_the_end():
    for name in ("heun", "dpm_2", "dpm_2_a"):
        calls, _ = run_sampler(name, 4, 1)
        expected = REFERENCES[name](4, 1)
        assert len(calls) == len(expected) == 7
        for (t, x), (t_ref, x_ref) in zip(calls, expected):
            assert t == pytest.approx(t_ref, abs=2e-3)
            np.testing.assert_allclose(x, x_ref, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------------------------------------ upstream's settings

MAPPING = [
    ("ddim", DDIMScheduler, dict(clip_sample=True, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)),
    ("pndm", PNDMScheduler, dict(skip_prk_steps=False, timestep_spacing="leading", steps_offset=0)),
    ("lms", LMSDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("k_lms", LMSDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("euler", EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("k_euler", EulerDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("euler_a", EulerAncestralDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("k_euler_a", EulerAncestralDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("heun", HeunDiscreteScheduler, dict(clip_sample=True, timestep_spacing="linspace")),
    ("dpm_2", KDPM2DiscreteScheduler, dict(timestep_spacing="linspace")),
    ("k_dpm_2", KDPM2DiscreteScheduler, dict(timestep_spacing="linspace")),
    ("dpm_2_a", KDPM2AncestralDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("k_dpm_2_a", KDPM2AncestralDiscreteScheduler, dict(timestep_spacing="linspace")),
    ("dpmsolver", DPMSolverMultistepScheduler,
     dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=2, solver_type="midpoint")),
    ("dpmsolver++", DPMSolverMultistepScheduler,
     dict(algorithm_type="dpmsolver++", final_sigmas_type="zero", solver_order=2, solver_type="midpoint")),
    ("dpmsingle", DPMSolverSinglestepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
]


def test_every_sampler_name_of_upstream_is_mapped():
    assert [name for name, _, _ in MAPPING] and {name for name, _, _ in MAPPING} == set(samplers.SAMPLER_NAMES)
    assert samplers.SAMPLER_NAMES[0] == samplers.DEFAULT_TRAINING_SAMPLER == "ddim"


@pytest.mark.parametrize("name, scheduler_class, config", MAPPING)
@pytest.mark.parametrize("v_parameterization", [False, True])
def test_each_name_builds_upstreams_scheduler(name, scheduler_class, config, v_parameterization):
    scheduler = samplers.make_scheduler(name, v_parameterization)
    assert isinstance(scheduler, scheduler_class)
    expected = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="v_prediction" if v_parameterization else "epsilon", **config)
    assert {key: scheduler.config[key] for key in expected} == expected


def test_dpmsingle_samples_as_the_scheduler_with_upstreams_arguments_does():
    """lower_order_final=True is what diffusers switches to itself (with a warning) for upstream's arguments."""
    upstream = DPMSolverSinglestepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear")
    upstream.set_timesteps(5)
    calls, latents = run_sampler("dpmsingle", 5, 2)
    x = ms.Tensor(start(2)[0].astype(np.float32))
    for (t_seen, x_seen), t in zip(calls, upstream.timesteps):
        assert t_seen == float(t.asnumpy())
        np.testing.assert_allclose(x_seen, x.asnumpy(), rtol=1e-6, atol=1e-6)
        eps = ms.Tensor(fake_eps(x.asnumpy().astype(np.float64), float(t.asnumpy())).astype(np.float32))
        x = upstream.step(eps, t, x)[0]
    np.testing.assert_allclose(latents, x.asnumpy(), rtol=1e-6, atol=1e-6)


class _StackOnCpu:
    """mindspore.mint with a `stack` that runs on CPU (StackExt has no CPU kernel in MindSpore 2.10)."""

    def __getattr__(self, name):
        return getattr(ms.mint, name)

    @staticmethod
    def stack(tensors, dim=0):
        return ops.stack(tensors, axis=dim)


@pytest.mark.parametrize("name, mindone_class", [("dpm_2", KDPM2DiscreteScheduler),
                                                  ("dpm_2_a", KDPM2AncestralDiscreteScheduler)])
def test_own_kdpm2_timesteps_are_mindones_without_its_nan(monkeypatch, name, mindone_class):
    import sys
    monkeypatch.setattr(sys.modules[mindone_class.__module__], "mint", _StackOnCpu())
    theirs = mindone_class(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = samplers.make_scheduler(name)
    steps = 6
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    tables = ["timesteps", "sigmas", "sigmas_interpol"] + (["sigmas_down"] if name == "dpm_2_a" else [])
    for table in tables:
        a, b = getattr(theirs, table).asnumpy(), getattr(ours, table).asnumpy()
        assert a.shape == b.shape and np.isfinite(b).all(), table
        finite = np.isfinite(a)
        atol = 1e-3 if table == "timesteps" else 1e-6  # a timestep moves ~1e-4 per 1e-6 relative in sigma
        np.testing.assert_allclose(b[finite], a[finite], rtol=1e-5, atol=atol, err_msg=table)
    if name == "dpm_2":
        # the last step reads sigmas_interpol[2 * steps - 1]: NaN in mindone's (MindSpore's lerp of log 0), 0 here
        assert np.isnan(theirs.sigmas_interpol.asnumpy()[2 * steps - 1])
        assert ours.sigmas_interpol.asnumpy()[2 * steps - 1] == 0


@pytest.mark.parametrize("name, steps, message", [
    ("plms", 5, r"sampler 'plms': expected one of ddim, pndm, lms"),
    ("pndm", 3, r"sampler pndm needs at least 4 steps, got 3"),
])
def test_a_wrong_sampler_or_too_few_steps_fails_before_sampling(name, steps, message):
    with pytest.raises(ValueError, match=message):
        samplers.sample_latents(name, lambda x, t: pytest.fail("sampled"), np.zeros(SHAPE, np.float32), steps, 0)


def test_ancestral_noise_comes_from_the_given_generator_only():
    np.random.seed(0)
    state = np.random.get_state()
    first = run_sampler("euler_a", 4, 9)[1]
    np.random.seed(1)  # another global state: no effect
    assert np.array_equal(run_sampler("euler_a", 4, 9)[1], first)
    assert not np.array_equal(run_sampler("euler_a", 4, 10)[1], first)
    np.random.set_state(state)


# ------------------------------------------------------------------------------------------------ the tiny model

SIZE = (64, 64)


def steps_for(name):
    return max(2, samplers.SAMPLERS[name].min_steps)


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_every_sampler_makes_a_finite_image_on_the_tiny_model(pipeline, monkeypatch, name):
    final_latents = []
    sample_latents = samplers.sample_latents

    def recording(*args, **kwargs):
        final_latents.append(sample_latents(*args, **kwargs))
        return final_latents[-1]

    monkeypatch.setattr(samplers, "sample_latents", recording)
    image = pipeline.generate("a red cube", target_size=SIZE, steps=steps_for(name), seed=1, progress=False,
                              sampler=name)
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
    assert len(final_latents) == 1 and np.isfinite(final_latents[0].asnumpy()).all()


@pytest.mark.parametrize("name", ["euler_a", "dpm_2_a"])
def test_an_ancestral_sampler_gives_the_same_image_for_the_same_seed(pipeline, name):
    def generate(seed):
        return pipeline.generate("a red cube", target_size=SIZE, steps=3, seed=seed, progress=False, sampler=name)

    np.random.seed(0)
    first = generate(4)
    np.random.seed(1)  # the global generator plays no part
    np.testing.assert_array_equal(generate(4), first)
    assert not np.array_equal(generate(5), first)


# ------------------------------------------------------------------------------------------------ sample_images

@pytest.mark.parametrize("step, epoch, at_first, n_steps, n_epochs, expected", [
    (0, 0, True, None, None, True),  # --sample_at_first, before training
    (0, 0, False, 10, 1, False),
    (10, None, False, 10, None, True),  # every N steps, after an optimizer step
    (15, None, False, 10, None, False),
    (10, 1, False, 10, None, False),  # ... but not at an epoch's end
    (10, None, False, 10, 1, False),  # every N epochs wins over every N steps
    (12, 2, False, 10, 2, True),
    (12, 3, False, 10, 2, False),
    (10, None, False, None, None, False),
    (10, None, False, 0, None, False),  # 0 disables, as upstream's argument check
    (12, 2, False, None, -1, False),
])
def test_when_to_sample_follows_upstream(step, epoch, at_first, n_steps, n_epochs, expected):
    assert si.should_sample(step, epoch, sample_at_first=at_first, every_n_steps=n_steps,
                            every_n_epochs=n_epochs) is expected


@pytest.mark.parametrize("output_name, step, epoch, index, seed, name", [
    ("run", 7, None, 0, 3, "run_000007_00_20240102030405_3.png"),
    ("run", 1234, 2, 11, None, "run_e000002_11_20240102030405.png"),
    (None, 7, None, 1, None, "000007_01_20240102030405.png"),
    ("", 0, 0, 0, 0, "_e000000_00_20240102030405_0.png"),  # upstream tests `is None`
])
def test_sample_file_names_are_upstreams(output_name, step, epoch, index, seed, name):
    assert si.sample_image_name(output_name, step, epoch, index, seed, "20240102030405") == name


def cell_states(models):
    return [(path, cell.training, cell.phase, dict(cell.get_flags()))
            for model in models for path, cell in model.cells_and_names()]


def test_sample_images_writes_upstreams_files_and_leaves_the_training_state_alone(pipeline, tmp_path, monkeypatch):
    prompts = [parse_prompt_line("a red cube --w 64 --h 64 --s 2 --d 3 --ss euler_a", "p.txt: line 1", 0),
               parse_prompt_line("a blue sphere --n ugly --w 96 --h 64 --s 2 --l 5", "p.txt: line 2", 1)]
    # a training-like state: UNet and one text encoder in train mode, the VAE (as when frozen) in eval mode
    pipeline.unet.set_train(True)
    pipeline.text_encoder1.set_train(True)
    before = cell_states(pipeline.models)
    random.seed(5)
    np.random.seed(5)
    global_states = random.getstate(), np.random.get_state(), ms.get_rng_state().asnumpy()
    for module, name in ((np.random, "seed"), (random, "seed"), (ms, "set_seed")):
        monkeypatch.setattr(module, name, lambda *a, _what=f"{module.__name__}.{name}", **k: pytest.fail(_what))
    modes_seen = []
    generate = pipeline.generate

    def spying_generate(**kwargs):
        modes_seen.append({cell.training for model in pipeline.models for _, cell in model.cells_and_names()})
        return generate(**kwargs)

    monkeypatch.setattr(pipeline, "generate", spying_generate)
    try:
        results = si.sample_images(pipeline, prompts, str(tmp_path), step=7, output_name="run",
                                   default_sampler="dpm_2")
    finally:
        monkeypatch.undo()
        after = cell_states(pipeline.models)
        pipeline.unet.set_train(False)
        pipeline.text_encoder1.set_train(False)

    assert modes_seen == [{False}, {False}]  # generated in eval mode
    assert after == before  # every cell's flag, phase and graph flags as before
    assert random.getstate() == global_states[0]
    np.testing.assert_equal(np.random.get_state(), global_states[1])
    np.testing.assert_array_equal(ms.get_rng_state().asnumpy(), global_states[2])  # MindSpore's generator too

    sample_dir = tmp_path / "sample"
    names = sorted(os.listdir(sample_dir))
    assert len(names) == 2 and [os.path.basename(r.path) for r in results] == names  # no .tmp left
    assert re.fullmatch(r"run_000007_00_\d{14}_3\.png", names[0])  # a seed given: suffixed
    assert re.fullmatch(r"run_000007_01_\d{14}\.png", names[1])  # none given: a random one, not in the name
    first, second = results
    assert (first.seed, first.sampler, second.sampler) == (3, "euler_a", "dpm_2")
    assert second.image.shape == (64, 96, 3)
    for result in results:
        with Image.open(result.path) as png:
            np.testing.assert_array_equal(np.asarray(png), result.image)
            text = dict(png.text)
        p = result.prompt
        assert text == dict(prompt=p.prompt, negative_prompt=p.negative_prompt, seed=str(result.seed),
                            steps=str(p.steps), scale=str(p.scale), sampler=result.sampler, width=str(p.width),
                            height=str(p.height), training_step="7")
    assert dict(Image.open(second.path).text)["negative_prompt"] == "ugly"

    # the drawn seed reproduces the image
    again = pipeline.generate(prompt="a blue sphere", negative_prompt="ugly", target_size=(64, 96), steps=2,
                              guidance_scale=5.0, seed=second.seed, sampler="dpm_2", progress=False)
    np.testing.assert_array_equal(again, second.image)


def test_a_cfg_scale_of_at_most_1_samples_the_positive_prompt_alone(pipeline, tmp_path):
    """As upstream's pipeline: no guidance, so the negative prompt plays no part (up to rounding)."""
    prompts = [parse_prompt_line(f"a red cube --n {negative} --w 64 --h 64 --s 2 --d 1 --l {scale}", "p", i)
               for i, (negative, scale) in enumerate([("ugly", "0"), ("a green field at night", "1")])]
    results = si.sample_images(pipeline, prompts, str(tmp_path), step=1, epoch=1, default_sampler="euler")
    assert np.abs(results[0].image.astype(int) - results[1].image).max() <= 1
    assert [os.path.basename(r.path)[:10] for r in results] == ["e000001_00", "e000001_01"]
    assert dict(Image.open(results[0].path).text)["epoch"] == "1"


def test_a_size_the_model_cannot_take_fails_before_any_image(pipeline, tmp_path):
    prompts = [parse_prompt_line("a red cube --w 64 --h 64 --s 2", "p: line 1", 0),
               parse_prompt_line("a red cube --w 72 --h 64 --s 2", "p: line 2", 1, size_multiple=8)]
    with pytest.raises(ValueError, match=r"^p: line 2: 72x64 \(WxH\): both sides must be multiples of 32"):
        si.sample_images(pipeline, prompts, str(tmp_path), step=1)
    assert not (tmp_path / "sample").exists() or not os.listdir(tmp_path / "sample")


def test_from_models_uses_the_models_as_they_are(pipeline):
    pipeline.unet.set_train(True)
    try:
        wrapped = smi.SdxlPipeline.from_models(*pipeline.models, pipeline.tokenizer, dtype="fp32", graph_mode=False)
        assert pipeline.unet.training  # no set_train on construction
    finally:
        pipeline.unet.set_train(False)
    assert all(a is b for a, b in zip(wrapped.models, pipeline.models))
    assert wrapped.size_multiple == pipeline.size_multiple
    assert (wrapped.dtype, wrapped.vae_dtype) == (ms.float32, ms.float32)
    settings = dict(prompt="a red cube", target_size=SIZE, steps=2, seed=1, progress=False)
    np.testing.assert_array_equal(wrapped.generate(**settings), pipeline.generate(**settings))


def test_sample_images_in_the_trainers_graph_mode_gives_the_eager_image(pipeline, tmp_path):
    """The trainer runs with GRAPH_MODE set: text encoders and VAE run as graphs, the UNet as a jitted function."""
    prompt = parse_prompt_line("a red cube --w 64 --h 64 --s 2 --d 2 --ss euler_a", "p", 0)
    eager = si.sample_images(pipeline, [prompt], str(tmp_path / "eager"), step=1)[0].image
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_pipeline = smi.SdxlPipeline.from_models(*pipeline.models, pipeline.tokenizer, graph_mode=True)
        images = [si.sample_images(graph_pipeline, [prompt], str(tmp_path / "graph"), step=s)[0].image
                  for s in (1, 2)]
    finally:
        smi.use_synchronous_pynative()
    assert np.abs(images[0].astype(int) - eager).max() <= 2
    np.testing.assert_array_equal(images[1], images[0])
