"""The samplers of Kohya's `--sample_sampler`, as diffusers schedulers, and one denoising loop for all of them.

Each name maps to the scheduler upstream's `get_my_scheduler` builds (diffusers 0.32 there, mindone.diffusers
0.5 = diffusers 0.35 here; nothing these settings use changed in between): SD's 1000-step scaled-linear betas
(0.00085 .. 0.012), diffusers' defaults otherwise, `prediction_type="v_prediction"` with --v_parameterization.
Upstream then forces `clip_sample=True` on every scheduler whose config has the field: DDIM (its default anyway)
and Heun (default False), which clip the predicted x0 to [-1, 1] at every step; we pass it to the constructor.

Where a mindone scheduler does not work as is, the difference is in `SAMPLERS[name].source`:
- `dpmsolver`: diffusers refuses `algorithm_type="dpmsolver"` with its default `final_sigmas_type="zero"` (so
  upstream's `--sample_sampler dpmsolver` fails when the scheduler is built); we pass `"sigma_min"`, the only
  value it accepts.
- `dpmsingle`: `lower_order_final=True`, which diffusers switches on anyway (with a warning) for every step count.
- `dpm_2`, `dpm_2_a` (and `k_` twins): mindone's KDPM2 schedulers build their timesteps with `mint.stack`, which
  has no CPU kernel in MindSpore 2.10, and the non-ancestral one takes the log-midpoint of sigma 0 with
  MindSpore's `lerp`, which gives NaN where torch's gives 0 (the last step then turns the image NaN). Here
  `set_timesteps` is our own (numpy, the same schedule); mindone's `step` and `scale_model_input` are kept.

Randomness: the ancestral samplers (euler_a, dpm_2_a) draw their noise from the numpy Generator passed to
`sample_latents`, never from a global generator; the others draw nothing.
"""

import inspect
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Union

import mindspore as ms
import numpy as np
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
from tqdm import tqdm

# upstream's scheduler constants (train_util.SCHEDULER_*)
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"

DEFAULT_TRAINING_SAMPLER = "ddim"  # upstream's --sample_sampler default
DEFAULT_INFERENCE_SAMPLER = "euler"  # what sdxl_minimal_inference.py always used


# ------------------------------------------------------------------------------------------------ KDPM2 timesteps

def _log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp((log a + log b) / 2) elementwise, 0 where a or b is 0 (torch's lerp of the logs gives 0 or NaN there;
    the NaN lands only in entries the schedulers never read)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_a, log_b = np.log(a), np.log(b)
        mid = np.exp(log_a + np.float32(0.5) * (log_b - log_a))
    return np.where((a == 0) | (b == 0), np.float32(0), mid).astype(np.float32)


def _repeat_inner(values: np.ndarray) -> np.ndarray:
    """[v0, v1, v1, v2, v2, ..., vn, vn, vn]: the layout of the KDPM2 schedulers' per-call sigma tables."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2), values[-1:]])


class _NumpyKDPM2Timesteps:
    """`set_timesteps` of the KDPM2 schedulers in numpy (see the module docstring); linspace spacing only."""

    _ancestral = False

    def set_timesteps(self, num_inference_steps: int, num_train_timesteps: Optional[int] = None):
        config = self.config
        if config.timestep_spacing != "linspace" or config.use_karras_sigmas or config.use_exponential_sigmas \
                or config.use_beta_sigmas:
            raise NotImplementedError(f"{type(self).__name__}: only timestep_spacing='linspace' without karras/"
                                      "exponential/beta sigmas is implemented")
        self.num_inference_steps = num_inference_steps
        num_train_timesteps = num_train_timesteps or config.num_train_timesteps
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
        alphas_cumprod = self.alphas_cumprod.asnumpy()
        train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)

        if self._ancestral:
            # each step: deterministic to sigma_down, then noise of std sigma_up, with down^2 + up^2 = next^2
            sigmas_next = np.append(sigmas[1:], np.float32(0))
            with np.errstate(divide="ignore", invalid="ignore"):
                sigmas_up = np.sqrt(sigmas_next ** 2 * (sigmas ** 2 - sigmas_next ** 2) / sigmas ** 2)
            sigmas_up = np.nan_to_num(sigmas_up).astype(np.float32)  # 0/0 at sigma 0, never read
            sigmas_down = np.sqrt(np.maximum(sigmas_next ** 2 - sigmas_up ** 2, 0)).astype(np.float32)
            sigmas_down[-1] = 0
            sigmas_interpol = _log_midpoint(sigmas, sigmas_down)
            sigmas_interpol[-2:] = 0
            self.sigmas_up = ms.tensor(_repeat_inner(sigmas_up))
            self.sigmas_down = ms.tensor(_repeat_inner(sigmas_down))
            # the midpoint evaluation of step i sits between sigma_i and sigma_down_i
            midpoints = sigmas_interpol[:-2]
        else:
            # the midpoint of step i sits between sigma_i and sigma_(i+1); entry 0 is never read
            sigmas_interpol = _log_midpoint(sigmas, np.roll(sigmas, 1))
            midpoints = sigmas_interpol[1:-1]

        midpoint_timesteps = self._sigma_to_t(midpoints, log_sigmas).astype(np.float32)
        interleaved = np.stack([midpoint_timesteps, timesteps[1:]], axis=-1).reshape(-1)
        self.log_sigmas = ms.tensor(log_sigmas)
        self.sigmas = ms.tensor(_repeat_inner(sigmas))
        self.sigmas_interpol = ms.tensor(_repeat_inner(sigmas_interpol))
        self.timesteps = ms.tensor(np.concatenate([timesteps[:1], interleaved]).astype(np.float32))
        self.sample = None
        self._step_index = None
        self._begin_index = None


class NumpyTimestepsKDPM2DiscreteScheduler(_NumpyKDPM2Timesteps, KDPM2DiscreteScheduler):
    """mindone's KDPM2DiscreteScheduler (DPM-Solver-2) with our own `set_timesteps`."""


class NumpyTimestepsKDPM2AncestralDiscreteScheduler(_NumpyKDPM2Timesteps, KDPM2AncestralDiscreteScheduler):
    """mindone's KDPM2AncestralDiscreteScheduler with our own `set_timesteps`."""

    _ancestral = True


# ------------------------------------------------------------------------------------------------ the table

class Sampler(NamedTuple):
    scheduler_class: type
    kwargs: Dict[str, object]  # beyond the betas and the prediction type
    source: str  # where the implementation comes from
    min_steps: int = 1


_MINDONE = "mindone.diffusers"
SAMPLERS: Dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler, {"clip_sample": True}, _MINDONE),
    # PNDM's Runge-Kutta warm-up needs 4 timesteps: fewer fail inside diffusers (upstream too)
    "pndm": Sampler(PNDMScheduler, {}, _MINDONE, min_steps=4),
    "lms": Sampler(LMSDiscreteScheduler, {}, _MINDONE),
    "euler": Sampler(EulerDiscreteScheduler, {}, _MINDONE),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, {}, _MINDONE),
    "heun": Sampler(HeunDiscreteScheduler, {"clip_sample": True}, _MINDONE),
    "dpm_2": Sampler(NumpyTimestepsKDPM2DiscreteScheduler, {}, _MINDONE + " step, own set_timesteps"),
    "dpm_2_a": Sampler(NumpyTimestepsKDPM2AncestralDiscreteScheduler, {}, _MINDONE + " step, own set_timesteps"),
    "dpmsolver": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
                         _MINDONE + " (final_sigmas_type='sigma_min')"),
    "dpmsolver++": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, _MINDONE),
    "dpmsingle": Sampler(DPMSolverSinglestepScheduler, {"lower_order_final": True}, _MINDONE),
}
for _name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"):
    SAMPLERS["k_" + _name] = SAMPLERS[_name]  # upstream maps each k_ name to the same scheduler
del _name

# upstream's --sample_sampler choices, in its order
SAMPLER_NAMES = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
assert set(SAMPLER_NAMES) == set(SAMPLERS)


def check_sampler(name: str, steps: Optional[int] = None, what: str = "sampler") -> str:
    """`name` if it is one of SAMPLER_NAMES (and `steps` is enough for it); ValueError otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"{what} {name!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    if steps is not None:
        if steps < SAMPLERS[name].min_steps:
            raise ValueError(f"{what} {name} needs at least {SAMPLERS[name].min_steps} steps, got {steps}")
    return name


def make_scheduler(name: str, v_parameterization: bool = False):
    """A new scheduler for sampler `name` (not yet given its timesteps), configured as upstream's."""
    check_sampler(name)
    sampler = SAMPLERS[name]
    kwargs = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                  beta_schedule=BETA_SCHEDULE, **sampler.kwargs)
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates algorithm_type="dpmsolver"
        return sampler.scheduler_class(**kwargs)


def as_generator(seed_or_generator: Union[int, np.random.Generator]) -> np.random.Generator:
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    return np.random.default_rng(seed_or_generator)


def sample_latents(sampler: str, predict_noise: Callable[[ms.Tensor, ms.Tensor], ms.Tensor], noise: np.ndarray,
                   steps: int, generator: Union[int, np.random.Generator], progress: bool = True,
                   v_parameterization: bool = False) -> ms.Tensor:
    """Denoise `noise` (a unit normal draw, (B, 4, h, w)) in `steps` steps of `sampler`.

    `predict_noise(model_input, t)` returns the model's output (eps, or v with `v_parameterization`) for the
    scaled input and the timestep, a float32 scalar tensor. It runs once per entry of the scheduler's timesteps:
    `steps` times, 2 * steps - 1 for the second-order heun and dpm_2(_a), more for pndm's warm-up.
    `generator` (a numpy Generator, or a seed for one) gives the ancestral samplers their noise; pass the one
    that drew `noise`, so that the two streams do not overlap.
    """
    check_sampler(sampler, steps)
    generator = as_generator(generator)
    scheduler = make_scheduler(sampler, v_parameterization)
    scheduler.set_timesteps(steps)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    latents = ms.Tensor(noise, ms.float32) * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc=f"sampling ({sampler})", disable=not progress):
        model_input = scheduler.scale_model_input(latents, t)
        # one timestep dtype for every sampler: a compiled model sees the same input signature
        model_output = predict_noise(model_input, t.astype(ms.float32))
        latents = scheduler.step(model_output, t, latents, **step_kwargs)[0]
    return latents
