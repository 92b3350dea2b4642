"""Noise sampling and loss weighting for diffusion training, as Kohya's sd-scripts does it.

Everything that runs per step is written with `mindspore.ops` so it can live inside a graph-mode
train step. Flags are resolved once, in Python, when `DiffusionNoiseAndLoss` is built; the traced
code only sees constants and tensors. The random draws (noise, timesteps, offsets, multires levels)
are made on the host by `library.noise_sampling.NoiseSampler` and passed in, so they are resumable.

Upstream spreads this over `train_util.get_noise_noisy_latents_and_timesteps`,
`train_util.get_huber_threshold_if_needed`, `train_util.conditional_loss`,
`NetworkTrainer.post_process_loss` and `custom_train_functions`; the public names are kept.

Order a train step follows (what `DiffusionNoiseAndLoss` wraps):
    noise, noisy_latents, timesteps = noisy_latents_from_draws(latents, draws)  # offset, multires, ip noise
    target = get_target(latents, noise, timesteps)    # noise, or velocity for v-prediction
    loss = compute_loss(model_pred, target, timesteps, loss_weights[, masks])  # masks: masked loss only
"""

import argparse
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

NUM_TRAIN_TIMESTEPS = 1000
LATENT_STRIDE = 8  # image pixels per latent pixel along each side (the VAE's downsampling)


# ---------------------------------------------------------------------------------------------
# noise schedule constants (numpy, computed once)


def ddpm_alphas_cumprod(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=False
):
    """alphas_cumprod of diffusers' DDPMScheduler("scaled_linear"), in float32 like torch computes it."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    if zero_terminal_snr:
        betas = _enforce_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _enforce_zero_terminal_snr(betas):
    # arXiv 2305.08891: shift and rescale sqrt(alphas_cumprod) so the last step has zero signal
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def snr_from_alphas_cumprod(alphas_cumprod):
    """all_snr of `prepare_scheduler_for_custom_training`: (sqrt(a) / sqrt(1 - a))**2."""
    a = alphas_cumprod.astype(np.float32)
    return ((np.sqrt(a) / np.sqrt(1.0 - a)) ** 2).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# noise (deterministic given the random draws, so tests can inject them)


def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale, offset_noise):
    """noise + offset * offset_noise; `offset_noise` is a (B, C, 1, 1) standard normal draw.

    `noise_offset` is a float, or a tensor for --noise_offset_random_strength. With
    --adaptive_noise_scale the offset grows with |mean over H,W of the latents|, clamped at 0.
    """
    if adaptive_noise_scale is not None:
        latent_mean = ops.abs(latents.mean(axis=(2, 3), keep_dims=True))
        noise_offset = ops.clamp(noise_offset + adaptive_noise_scale * latent_mean, min=0.0)
    return noise + noise_offset * offset_noise


def bilinear_resize_matrix(in_size, out_size, max_in_size):
    """(out_size, max_in_size) matrix M with M @ x == torch bilinear resize (align_corners=False) of x[:in_size].

    `in_size` may be a tensor: the matrix is how multires noise resizes a grid whose size is drawn at
    run time, while every shape in the graph stays static. Columns >= in_size are zero.
    """
    in_size = ops.cast(in_size, ms.float32)
    # ops.arange, not numpy: under dynamic shapes (library/graph_compile.py) the sizes are known only at run time
    dst = ops.arange(0, out_size, dtype=ms.float32)
    src = ops.clamp((dst + 0.5) * (in_size / out_size) - 0.5, min=0.0)  # half-pixel centres
    i0 = ops.floor(src)
    i1 = ops.minimum(i0 + 1.0, in_size - 1.0)
    w1 = src - i0
    cols = ops.arange(0, max_in_size, dtype=ms.float32)
    hit0 = ops.cast(ops.equal(cols[None, :], i0[:, None]), ms.float32)
    hit1 = ops.cast(ops.equal(cols[None, :], i1[:, None]), ms.float32)
    return hit0 * (1.0 - w1)[:, None] + hit1 * w1[:, None]


def pyramid_level_sizes(height, width, iterations):
    """Largest grid each multires level can draw: r >= 2, so level i is at most size / 2**i."""
    return [(max(1, int(height / 2**i)), max(1, int(width / 2**i))) for i in range(iterations)]


def pyramid_noise_like(noise, scales, level_noises, discount):
    """Multires ("pyramid") noise of `custom_train_functions.pyramid_noise_like`.

    Level i adds standard normal noise drawn on a (H / r_i**i, W / r_i**i) grid, bilinearly upsampled
    to (H, W) and multiplied by discount**i; the first level whose grid reaches 1 pixel is the last one.
    The sum is divided by its (unbiased) standard deviation over the whole batch.

    scales: (iterations,) float tensor of r_i in [2, 4). level_noises: one (B, C, h_i, w_i) draw per
    level at the sizes of `pyramid_level_sizes`; level i uses its top-left (H / r**i, W / r**i) corner.
    """
    _, _, height, width = noise.shape
    alive = Tensor(1.0, ms.float32)  # becomes 0 after the level that reached 1 pixel (upstream's break)
    for i, level_noise in enumerate(level_noises):
        factor = ops.pow(scales[i], float(i))
        h_i = ops.maximum(ops.floor(height / factor), 1.0)
        w_i = ops.maximum(ops.floor(width / factor), 1.0)
        rows = bilinear_resize_matrix(h_i, height, level_noise.shape[2])
        cols = bilinear_resize_matrix(w_i, width, level_noise.shape[3])
        upsampled = ops.matmul(ops.matmul(rows, level_noise), cols.T)
        noise = noise + upsampled * (alive * discount**i)
        alive = alive * ops.cast(ops.logical_and(h_i > 1.0, w_i > 1.0), ms.float32)
    centred = noise - noise.mean()
    std = ops.sqrt((centred * centred).sum() / (noise.size - 1))
    return noise / std


# ---------------------------------------------------------------------------------------------
# forward process and targets


def _per_sample(values, timesteps, ndim):
    # gather a (num_train_timesteps,) table at the timesteps, shaped to broadcast over a sample
    return ops.gather(values, timesteps, 0).reshape((-1,) + (1,) * (ndim - 1))


def ddpm_add_noise(latents, noise, timesteps, alphas_cumprod):
    """DDPMScheduler.add_noise: sqrt(a_t) * x0 + sqrt(1 - a_t) * noise."""
    a = _per_sample(alphas_cumprod, timesteps, latents.ndim).astype(latents.dtype)
    return ops.sqrt(a) * latents + ops.sqrt(1.0 - a) * noise


def ddpm_get_velocity(latents, noise, timesteps, alphas_cumprod):
    """DDPMScheduler.get_velocity: the v-prediction target sqrt(a_t) * noise - sqrt(1 - a_t) * x0."""
    a = _per_sample(alphas_cumprod, timesteps, latents.ndim).astype(latents.dtype)
    return ops.sqrt(a) * noise - ops.sqrt(1.0 - a) * latents


# ---------------------------------------------------------------------------------------------
# loss


def get_huber_c(timesteps, huber_schedule, huber_c, huber_scale, alphas_cumprod, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """Per-sample Huber threshold (`get_huber_threshold_if_needed`); the snr schedule ignores huber_scale."""
    t = ops.cast(timesteps, ms.float32)
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return ops.exp(-alpha * t) * huber_scale
    if huber_schedule == "snr":
        a = ops.gather(alphas_cumprod, timesteps, 0)
        sigmas = ops.sqrt((1.0 - a) / a)
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    if huber_schedule == "constant":
        return ops.ones_like(t) * (huber_c * huber_scale)
    raise ValueError(f"--huber_schedule must be one of constant, exponential, snr; got {huber_schedule!r}")


def conditional_loss(model_pred, target, loss_type, huber_c=None):
    """Per-element loss (reduction "none") for --loss_type l2 / l1 / huber / smooth_l1."""
    diff = model_pred - target
    if loss_type == "l2":
        return diff * diff
    if loss_type == "l1":
        return ops.abs(diff)
    if loss_type in ("huber", "smooth_l1"):
        c = huber_c.reshape((-1,) + (1,) * (model_pred.ndim - 1))
        root = ops.sqrt(diff * diff + c * c) - c
        return 2.0 * c * root if loss_type == "huber" else 2.0 * root
    raise ValueError(f"--loss_type must be one of l1, l2, huber, smooth_l1; got {loss_type!r}")


def apply_masked_loss(loss, masks):
    """Upstream's `apply_masked_loss`: the (B, 1, H, W) masks in [0, 1] at image size are resized to the loss's
    (h, w) = (H, W) / 8 with "area" interpolation (the mean of each 8x8 block) and multiply the per-pixel loss,
    before the per-sample mean (so masked-out pixels count as zero loss, not as absent)."""
    pooled = ops.AvgPool(kernel_size=LATENT_STRIDE, strides=LATENT_STRIDE)(masks.astype(loss.dtype))
    return loss * pooled


def apply_snr_weight(loss, timesteps, all_snr, gamma, v_prediction=False):
    """Min-SNR-gamma weighting: min(snr, gamma) / snr, or / (snr + 1) for v-prediction."""
    snr = ops.gather(all_snr, timesteps, 0)
    min_snr_gamma = ops.minimum(snr, gamma)
    return loss * (min_snr_gamma / (snr + 1.0) if v_prediction else min_snr_gamma / snr)


def _snr_scale(timesteps, all_snr):
    snr = ops.minimum(ops.gather(all_snr, timesteps, 0), 1000.0)  # snr(t=0) is huge: upstream caps it
    return snr / (snr + 1.0)


def scale_v_prediction_loss_like_noise_prediction(loss, timesteps, all_snr):
    return loss * _snr_scale(timesteps, all_snr)


def add_v_prediction_like_loss(loss, timesteps, all_snr, v_pred_like_loss):
    return loss + loss / _snr_scale(timesteps, all_snr) * v_pred_like_loss


def apply_debiased_estimation(loss, timesteps, all_snr, v_prediction=False):
    """Debiased estimation: 1 / sqrt(snr), or 1 / (snr + 1) for v-prediction (snr capped at 1000)."""
    snr = ops.minimum(ops.gather(all_snr, timesteps, 0), 1000.0)
    return loss * (1.0 / (snr + 1.0) if v_prediction else 1.0 / ops.sqrt(snr))


# ---------------------------------------------------------------------------------------------
# everything a train step needs, with the flags resolved


@ms.jit_class
class DiffusionNoiseAndLoss:
    """Noise, timesteps, forward process, target and loss of one training step, for graph mode.

    Build it from the parsed args (`from_args`) after `mindspore.set_seed`, keep it as an attribute
    of the train step and call its methods inside `construct` in the order of the module docstring.
    """

    def __init__(
        self,
        *,
        v_parameterization=False,
        noise_offset=None,
        noise_offset_random_strength=False,
        adaptive_noise_scale=None,
        multires_noise_iterations=None,
        multires_noise_discount=0.3,
        ip_noise_gamma=None,
        ip_noise_gamma_random_strength=False,
        min_timestep=None,
        max_timestep=None,
        zero_terminal_snr=False,
        loss_type="l2",
        huber_schedule="snr",
        huber_c=0.1,
        huber_scale=1.0,
        min_snr_gamma=None,
        scale_v_pred_loss_like_noise_pred=False,
        v_pred_like_loss=None,
        debiased_estimation_loss=False,
    ):
        # upstream tests these flags for truthiness, so 0 / 0.0 means "off"
        self.v_parameterization = bool(v_parameterization)
        self.noise_offset = float(noise_offset) if noise_offset else None
        self.noise_offset_random_strength = bool(noise_offset_random_strength)
        self.adaptive_noise_scale = None if adaptive_noise_scale is None else float(adaptive_noise_scale)
        self.multires_noise_iterations = int(multires_noise_iterations) if multires_noise_iterations else 0
        self.multires_noise_discount = float(multires_noise_discount)
        self.ip_noise_gamma = float(ip_noise_gamma) if ip_noise_gamma else None
        self.ip_noise_gamma_random_strength = bool(ip_noise_gamma_random_strength)
        self.min_timestep = 0 if min_timestep is None else int(min_timestep)
        self.max_timestep = NUM_TRAIN_TIMESTEPS if max_timestep is None else int(max_timestep)
        self.loss_type = loss_type
        self.use_huber_c = loss_type in ("huber", "smooth_l1")
        self.huber_schedule = huber_schedule
        self.huber_c = float(huber_c)
        self.huber_scale = float(huber_scale)
        self.min_snr_gamma = float(min_snr_gamma) if min_snr_gamma else None
        self.scale_v_pred_loss_like_noise_pred = bool(scale_v_pred_loss_like_noise_pred)
        self.v_pred_like_loss = float(v_pred_like_loss) if v_pred_like_loss else None
        self.debiased_estimation_loss = bool(debiased_estimation_loss)

        self.alphas_cumprod = Tensor(ddpm_alphas_cumprod(zero_terminal_snr=zero_terminal_snr))
        # upstream computes all_snr before the zero-terminal-SNR fix, so the weightings keep the
        # original schedule (and stay finite at t=999) while add_noise uses the fixed one
        self.all_snr = Tensor(snr_from_alphas_cumprod(ddpm_alphas_cumprod()))


    @classmethod
    def from_args(cls, args):
        verify_noise_and_loss_args(args)
        return cls(
            v_parameterization=args.v_parameterization,
            noise_offset=args.noise_offset,
            noise_offset_random_strength=args.noise_offset_random_strength,
            adaptive_noise_scale=args.adaptive_noise_scale,
            multires_noise_iterations=args.multires_noise_iterations,
            multires_noise_discount=args.multires_noise_discount,
            ip_noise_gamma=args.ip_noise_gamma,
            ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
            min_timestep=args.min_timestep,
            max_timestep=args.max_timestep,
            zero_terminal_snr=args.zero_terminal_snr,
            loss_type=args.loss_type,
            huber_schedule=args.huber_schedule,
            huber_c=args.huber_c,
            huber_scale=args.huber_scale,
            min_snr_gamma=args.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred=args.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss=args.v_pred_like_loss,
            debiased_estimation_loss=args.debiased_estimation_loss,
        )

    def noisy_latents_from_draws(self, latents, draws):
        """(noise, noisy_latents, timesteps) from host draws laid out as `noise_sampling.NoiseSampler.fields`.

        draws: noise, timesteps, [offset_noise, offset_strength], [multires_scales, level_0..level_n-1],
        [ip_noise, ip_strength]; the strengths are U(0,1) draws, or ones without random strength.
        """
        noise, timesteps = draws[0], draws[1]
        i = 2
        if self.noise_offset is not None:
            offset = draws[i + 1] * self.noise_offset
            noise = apply_noise_offset(latents.astype(ms.float32), noise, offset, self.adaptive_noise_scale, draws[i])
            i += 2
        if self.multires_noise_iterations:
            levels = draws[i + 1 : i + 1 + self.multires_noise_iterations]
            noise = pyramid_noise_like(noise, draws[i], levels, self.multires_noise_discount)
            i += 1 + self.multires_noise_iterations
        noise = noise.astype(latents.dtype)
        perturbed = noise
        if self.ip_noise_gamma is not None:
            perturbed = noise + (draws[i + 1] * self.ip_noise_gamma * draws[i]).astype(noise.dtype)
        return noise, ddpm_add_noise(latents, perturbed, timesteps, self.alphas_cumprod), timesteps

    def get_target(self, latents, noise, timesteps):
        if self.v_parameterization:
            return ddpm_get_velocity(latents, noise, timesteps, self.alphas_cumprod)
        return noise

    def element_loss(self, model_pred, target, timesteps):
        """Per-element float32 loss before any mean (where a mask would be multiplied in)."""
        huber_c = None
        if self.use_huber_c:
            huber_c = get_huber_c(timesteps, self.huber_schedule, self.huber_c, self.huber_scale, self.alphas_cumprod)
        return conditional_loss(model_pred.astype(ms.float32), target.astype(ms.float32), self.loss_type, huber_c)

    def post_process_loss(self, loss, timesteps):
        """Per-sample weightings of `NetworkTrainer.post_process_loss`, in upstream's order."""
        if self.min_snr_gamma is not None:
            loss = apply_snr_weight(loss, timesteps, self.all_snr, self.min_snr_gamma, self.v_parameterization)
        if self.scale_v_pred_loss_like_noise_pred:
            loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, self.all_snr)
        if self.v_pred_like_loss is not None:
            loss = add_v_prediction_like_loss(loss, timesteps, self.all_snr, self.v_pred_like_loss)
        if self.debiased_estimation_loss:
            loss = apply_debiased_estimation(loss, timesteps, self.all_snr, self.v_parameterization)
        return loss

    def compute_loss(self, model_pred, target, timesteps, loss_weights, masks=None):
        """Scalar loss of `process_batch`: element loss [-> * masks] -> mean per sample -> * loss_weights ->
        weightings -> mean. `masks`: the batch's `alpha_masks` with masked loss, else None (a plain step)."""
        loss = self.element_loss(model_pred, target, timesteps)
        if masks is not None:
            loss = apply_masked_loss(loss, masks)
        loss = loss.mean(axis=tuple(range(1, loss.ndim)))
        loss = self.post_process_loss(loss * loss_weights.astype(ms.float32), timesteps)
        return loss.mean()


# ---------------------------------------------------------------------------------------------
# arguments


def verify_noise_and_loss_args(args):
    """Upstream's `verify_training_args` checks for these flags, plus range checks upstream lacks."""
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise ValueError("adaptive_noise_scale requires noise_offset / --adaptive_noise_scale needs --noise_offset")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise ValueError("scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization")
    if args.v_pred_like_loss and args.v_parameterization:
        raise ValueError("v_pred_like_loss cannot be enabled with v_parameterization")
    min_t = 0 if args.min_timestep is None else args.min_timestep
    max_t = NUM_TRAIN_TIMESTEPS if args.max_timestep is None else args.max_timestep
    if not 0 <= min_t <= NUM_TRAIN_TIMESTEPS or not 0 <= max_t <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"--min_timestep and --max_timestep must lie in [0, {NUM_TRAIN_TIMESTEPS}]; got {min_t}, {max_t}")
    if min_t >= max_t == NUM_TRAIN_TIMESTEPS:
        # min >= max means every sample uses max_timestep, and t=1000 would index past the schedule
        raise ValueError(f"--max_timestep must be < {NUM_TRAIN_TIMESTEPS} when --min_timestep >= --max_timestep")
    if args.loss_type in ("huber", "smooth_l1") and args.huber_schedule == "exponential" and not args.huber_c > 0:
        raise ValueError(f"--huber_schedule exponential needs --huber_c > 0; got {args.huber_c}")


def add_noise_and_loss_arguments(parser: argparse.ArgumentParser):
    """Noise/timestep/loss-type flags; upstream defines them in train_util.add_training_arguments."""
    parser.add_argument("--noise_offset", type=float, default=None,
                        help="enable noise offset with this value (around 0.1 is recommended)")
    parser.add_argument("--noise_offset_random_strength", action="store_true",
                        help="use a random strength between 0 and noise_offset for the noise offset")
    parser.add_argument("--multires_noise_iterations", type=int, default=None,
                        help="enable multires noise with this number of iterations (6-10 is recommended)")
    parser.add_argument("--ip_noise_gamma", type=float, default=None,
                        help="enable input perturbation noise (around 0.1 is recommended, arXiv 2301.11706)")
    parser.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                        help="use a random strength between 0 and ip_noise_gamma for input perturbation noise")
    parser.add_argument("--multires_noise_discount", type=float, default=0.3,
                        help="discount for multires noise (no effect without --multires_noise_iterations)")
    parser.add_argument("--adaptive_noise_scale", type=float, default=None,
                        help="add `latent mean absolute value * this value` to noise_offset (needs --noise_offset)")
    parser.add_argument("--zero_terminal_snr", action="store_true",
                        help="fix noise scheduler betas to enforce zero terminal SNR")
    parser.add_argument("--min_timestep", type=int, default=None,
                        help="minimum timestep for U-Net training (0-999, default 0)")
    parser.add_argument("--max_timestep", type=int, default=None,
                        help="maximum timestep for U-Net training (1-1000, default 1000)")
    parser.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
                        help="loss function: l1, l2 (default), huber or smooth_l1")
    parser.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                        help="schedule of the Huber threshold for huber/smooth_l1 losses (default snr)")
    parser.add_argument("--huber_c", type=float, default=0.1,
                        help="Huber loss decay parameter for huber/smooth_l1 losses (default 0.1)")
    parser.add_argument("--huber_scale", type=float, default=1.0,
                        help="Huber loss scale for the constant and exponential schedules (default 1.0)")


def add_masked_loss_arguments(parser: argparse.ArgumentParser):
    """Upstream's `train_util.add_masked_loss_arguments` (its `--alpha_mask` is a dataset flag)."""
    parser.add_argument("--conditioning_data_dir", type=str, default=None,
                        help="conditioning data directory; here masks come from the dataset config's subsets")
    parser.add_argument("--masked_loss", action="store_true",
                        help="apply mask for calculating loss. conditioning_data_dir is required for dataset")


def add_custom_train_arguments(parser: argparse.ArgumentParser, support_weighted_captions: bool = True):
    parser.add_argument("--min_snr_gamma", type=float, default=None,
                        help="gamma for min-SNR weighting; lower is stronger, 5 is recommended by the paper")
    parser.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                        help="scale v-prediction loss like noise prediction loss")
    parser.add_argument("--v_pred_like_loss", type=float, default=None,
                        help="add v-prediction like loss multiplied by this value")
    parser.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss")
    if support_weighted_captions:
        parser.add_argument("--weighted_captions", action="store_true", default=False,
                            help="enable weighted captions like (token:1.3); no commas inside parentheses, or "
                            "shuffle/dropout may break the weights")
