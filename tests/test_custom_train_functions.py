"""Noise and loss weighting compared with independent numpy formulas (upstream's torch code, restated)."""

import argparse
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from library import custom_train_functions as ctf

RNG = np.random.default_rng(0)


def t32(x):
    return Tensor(np.asarray(x, dtype=np.float32))


def ref_alphas_cumprod(zero_terminal_snr=False):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    if zero_terminal_snr:
        s = np.sqrt(np.cumprod(1 - betas))
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        return s**2
    return np.cumprod(1 - betas)


AC = ref_alphas_cumprod()
SNR = AC / (1 - AC)


def test_schedule_constants():
    ac = ctf.ddpm_alphas_cumprod()
    assert ac.dtype == np.float32 and ac.shape == (1000,)
    np.testing.assert_allclose(ac, AC, rtol=2e-5)
    np.testing.assert_allclose(ctf.snr_from_alphas_cumprod(ac), SNR, rtol=1e-4)
    zt = ctf.ddpm_alphas_cumprod(zero_terminal_snr=True)
    assert zt[-1] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(zt, ref_alphas_cumprod(True), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("adaptive", [None, 0.5, -5.0])
def test_noise_offset(adaptive):
    latents = RNG.standard_normal((2, 4, 6, 5)).astype(np.float32) + 0.3
    noise = RNG.standard_normal(latents.shape).astype(np.float32)
    offset_noise = RNG.standard_normal((2, 4, 1, 1)).astype(np.float32)
    out = ctf.apply_noise_offset(t32(latents), t32(noise), 0.1, adaptive, t32(offset_noise)).asnumpy()
    offset = 0.1
    if adaptive is not None:
        offset = np.maximum(0.1 + adaptive * np.abs(latents.mean(axis=(2, 3), keepdims=True)), 0.0)
    np.testing.assert_allclose(out, noise + offset * offset_noise, rtol=1e-6, atol=1e-6)
    if adaptive == -5.0:  # strongly negative: clamped to no offset at all
        np.testing.assert_allclose(out, noise, atol=1e-6)


def torch_bilinear_resize(x, out_h, out_w):
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) for (B, C, H, W), by loops."""
    in_h, in_w = x.shape[2:]

    def source(dst, in_size, out_size):
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        return i0, i1, src - i0

    out = np.zeros(x.shape[:2] + (out_h, out_w))
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        for xx in range(out_w):
            x0, x1, lx = source(xx, in_w, out_w)
            top = (1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1]
            bottom = (1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1]
            out[:, :, y, xx] = (1 - ly) * top + ly * bottom
    return out


@pytest.mark.parametrize("in_size,out_size,max_in", [(3, 8, 4), (1, 5, 2), (5, 16, 8), (7, 7, 7), (6, 4, 6)])
def test_bilinear_matrix_matches_torch_semantics(in_size, out_size, max_in):
    x = RNG.standard_normal((1, 1, max_in, max_in))
    m = ctf.bilinear_resize_matrix(Tensor(float(in_size)), out_size, max_in).asnumpy()
    assert np.all(m[:, in_size:] == 0)  # unused part of the larger draw never leaks in
    ours = m @ x[0, 0] @ m.T
    expected = torch_bilinear_resize(x[:, :, :in_size, :in_size], out_size, out_size)[0, 0]
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_bilinear_matrix_matches_mindspore_interpolate():
    """MindSpore's own bilinear resize (CPU kernel) has the same half-pixel semantics for a fixed size."""
    x = RNG.standard_normal((1, 2, 5, 3)).astype(np.float32)
    resized = ops.interpolate(t32(x), size=(12, 7), mode="bilinear", align_corners=False).asnumpy()
    rows = ctf.bilinear_resize_matrix(Tensor(5.0), 12, 5).asnumpy()
    cols = ctf.bilinear_resize_matrix(Tensor(3.0), 7, 3).asnumpy()
    np.testing.assert_allclose(rows @ x @ cols.T, resized, atol=1e-5)


def ref_pyramid(noise, scales, level_noises, discount):
    _, _, h, w = noise.shape
    noise = noise.astype(np.float64).copy()
    for i, (r, level) in enumerate(zip(scales, level_noises)):
        hn, wn = max(1, int(h / (float(r) ** i))), max(1, int(w / (float(r) ** i)))
        noise += torch_bilinear_resize(level[:, :, :hn, :wn], h, w) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std(ddof=1)


@pytest.mark.parametrize("shape,scales", [((2, 3, 16, 12), [3.0, 2.5, 3.3, 2.1]), ((1, 2, 8, 8), [2.2, 3.9, 3.1, 2.7])])
def test_pyramid_noise_matches_upstream(shape, scales):
    # the second case reaches a 1-pixel grid at level 2, so levels 3+ must be dropped (upstream's break)
    noise = RNG.standard_normal(shape).astype(np.float32)
    sizes = ctf.pyramid_level_sizes(shape[2], shape[3], len(scales))
    levels = [RNG.standard_normal(shape[:2] + s).astype(np.float32) for s in sizes]
    out = ctf.pyramid_noise_like(t32(noise), t32(scales), tuple(t32(l) for l in levels), 0.3).asnumpy()
    np.testing.assert_allclose(out, ref_pyramid(noise, scales, levels, 0.3), rtol=1e-4, atol=1e-5)


def test_add_noise_and_velocity():
    x0 = RNG.standard_normal((3, 4, 5, 5)).astype(np.float32)
    eps = RNG.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 500, 999])
    a = AC[t].reshape(-1, 1, 1, 1)
    ac = t32(ctf.ddpm_alphas_cumprod())
    tt = Tensor(t.astype(np.int32))
    np.testing.assert_allclose(ctf.ddpm_add_noise(t32(x0), t32(eps), tt, ac).asnumpy(),
                               np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ctf.ddpm_get_velocity(t32(x0), t32(eps), tt, ac).asnumpy(),
                               np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-4, atol=1e-5)


def test_huber_c_schedules():
    t = np.array([0, 10, 400, 999])
    tt = Tensor(t.astype(np.int32))
    ac = t32(ctf.ddpm_alphas_cumprod())
    c, scale = 0.2, 1.5
    sigma = np.sqrt((1 - AC[t]) / AC[t])
    expected = {
        "snr": (1 - c) / (1 + sigma) ** 2 + c,
        "exponential": np.exp(math.log(c) / 1000 * t) * scale,
        "constant": np.full(4, c * scale),
    }
    for schedule, ref in expected.items():
        np.testing.assert_allclose(ctf.get_huber_c(tt, schedule, c, scale, ac).asnumpy(), ref, rtol=1e-5)
    assert expected["exponential"][-1] == pytest.approx(c * scale, rel=1e-2)  # decays to c at t=1000


def test_conditional_losses():
    p = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    q = RNG.standard_normal(p.shape).astype(np.float32)
    c = np.array([0.1, 0.7], dtype=np.float32)
    cb = c.reshape(-1, 1, 1, 1)
    d = p - q
    expected = {
        "l2": d**2,
        "l1": np.abs(d),
        "huber": 2 * cb * (np.sqrt(d**2 + cb**2) - cb),
        "smooth_l1": 2 * (np.sqrt(d**2 + cb**2) - cb),
    }
    for loss_type, ref in expected.items():
        out = ctf.conditional_loss(t32(p), t32(q), loss_type, t32(c)).asnumpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--loss_type"):
        ctf.conditional_loss(t32(p), t32(q), "l3")


def test_snr_weightings():
    t = np.array([0, 3, 250, 999])
    tt = Tensor(t.astype(np.int32))
    snr_tab = t32(ctf.snr_from_alphas_cumprod(ctf.ddpm_alphas_cumprod()))
    loss = RNG.uniform(0.5, 2.0, 4).astype(np.float32)
    snr = SNR[t]
    capped = np.minimum(snr, 1000)
    cases = [
        (ctf.apply_snr_weight(t32(loss), tt, snr_tab, 5.0, False), loss * np.minimum(snr, 5) / snr),
        (ctf.apply_snr_weight(t32(loss), tt, snr_tab, 5.0, True), loss * np.minimum(snr, 5) / (snr + 1)),
        (ctf.scale_v_prediction_loss_like_noise_prediction(t32(loss), tt, snr_tab), loss * capped / (capped + 1)),
        (ctf.add_v_prediction_like_loss(t32(loss), tt, snr_tab, 0.3), loss + loss / (capped / (capped + 1)) * 0.3),
        (ctf.apply_debiased_estimation(t32(loss), tt, snr_tab, False), loss / np.sqrt(capped)),
        (ctf.apply_debiased_estimation(t32(loss), tt, snr_tab, True), loss / (capped + 1)),
    ]
    for ours, ref in cases:
        np.testing.assert_allclose(ours.asnumpy(), ref, rtol=1e-4)
    assert snr[0] > 1000  # the cap matters at t=0


def test_compute_loss_pipeline():
    helper = ctf.DiffusionNoiseAndLoss(v_parameterization=True, loss_type="smooth_l1", huber_schedule="constant",
                                       huber_c=0.3, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True,
                                       debiased_estimation_loss=True)
    p = RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)
    q = RNG.standard_normal(p.shape).astype(np.float32)
    w = np.array([1.0, 0.5], dtype=np.float32)
    t = np.array([20, 700])
    out = helper.compute_loss(t32(p), t32(q), Tensor(t.astype(np.int32)), t32(w)).asnumpy()
    per = (2 * (np.sqrt((p - q) ** 2 + 0.09) - 0.3)).mean(axis=(1, 2, 3)) * w
    snr = SNR[t]
    capped = np.minimum(snr, 1000)
    per = per * np.minimum(snr, 5) / (snr + 1) * capped / (capped + 1) / (capped + 1)
    assert float(out) == pytest.approx(per.mean(), rel=1e-4)


class _FromDraws(nn.Cell):
    def __init__(self, helper):
        super().__init__()
        self.helper = helper

    @ms.jit
    def construct(self, latents, *draws):
        return self.helper.noisy_latents_from_draws(latents, draws)


def test_noisy_latents_from_host_draws():
    helper = ctf.DiffusionNoiseAndLoss(noise_offset=0.1, adaptive_noise_scale=0.05, multires_noise_iterations=3,
                                       ip_noise_gamma=0.2)
    b, c, h, w = 2, 3, 8, 6
    latents = RNG.standard_normal((b, c, h, w)).astype(np.float32)
    noise = RNG.standard_normal(latents.shape).astype(np.float32)
    t = np.array([10, 900], dtype=np.int32)
    offset_noise, offset_strength = RNG.standard_normal((b, c, 1, 1)).astype(np.float32), np.float32([0.5])
    scales = np.float32([2.5, 3.1, 2.2])
    levels = [RNG.standard_normal((b, c) + s).astype(np.float32) for s in ctf.pyramid_level_sizes(h, w, 3)]
    ip_noise, ip_strength = RNG.standard_normal(latents.shape).astype(np.float32), np.float32([0.7])
    draws = [noise, t, offset_noise, offset_strength, scales, *levels, ip_noise, ip_strength]
    out_noise, noisy, out_t = (o.asnumpy() for o in _FromDraws(helper)(t32(latents), *(Tensor(d) for d in draws)))

    offset = 0.05 + 0.05 * np.abs(latents.mean(axis=(2, 3), keepdims=True))  # 0.5 * 0.1 + adaptive
    expected_noise = ref_pyramid(noise + offset * offset_noise, scales, levels, 0.3)
    np.testing.assert_allclose(out_noise, expected_noise, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out_t, t)
    a = AC[t].reshape(-1, 1, 1, 1)
    expected_noisy = np.sqrt(a) * latents + np.sqrt(1 - a) * (expected_noise + 0.7 * 0.2 * ip_noise)
    np.testing.assert_allclose(noisy, expected_noisy, rtol=1e-4, atol=1e-5)


def _parse(argv):
    parser = argparse.ArgumentParser()
    ctf.add_noise_and_loss_arguments(parser)
    ctf.add_custom_train_arguments(parser)
    parser.add_argument("--v_parameterization", action="store_true")
    return parser.parse_args(argv)


def test_arguments_and_checks():
    args = _parse([])
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert args.multires_noise_discount == 0.3 and args.min_snr_gamma is None and not args.weighted_captions
    ctf.verify_noise_and_loss_args(args)
    for argv, message in [
        (["--adaptive_noise_scale", "0.1"], "adaptive_noise_scale requires noise_offset"),
        (["--scale_v_pred_loss_like_noise_pred"], "only with v_parameterization"),
        (["--v_pred_like_loss", "0.1", "--v_parameterization"], "cannot be enabled with v_parameterization"),
        (["--max_timestep", "1001"], "--max_timestep"),
        (["--min_timestep", "1000"], "must be < 1000"),
    ]:
        with pytest.raises(ValueError, match=message):
            ctf.verify_noise_and_loss_args(_parse(argv))
    with pytest.raises(SystemExit):
        _parse(["--loss_type", "l3"])
