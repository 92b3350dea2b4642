"""The VAE: parameter layout and count, LDM <-> diffusers keys, blocks against numpy, shapes, graph mode."""

import json
import os
import re

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from library.autoencoder_kl import (
    SDXL_VAE_SCALE_FACTOR, Attention, AutoencoderKL, DiagonalGaussianDistribution, Downsample2D, ResnetBlock2D,
    Upsample2D, sample_diagonal_gaussian,
)
from library.model_util import convert_ldm_vae_checkpoint, convert_vae_state_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _vae_config(name):
    with open(os.path.join(CONFIG_DIR, name)) as f:
        return json.load(f)["vae"]


@pytest.fixture(scope="module")
def tiny_vae():
    ms.set_seed(0)
    return AutoencoderKL(**_vae_config("tiny_sdxl.json"))


@pytest.fixture(scope="module")
def sdxl_shapes():
    """Parameter name -> shape of the default (SDXL) VAE, without allocating its weights."""
    with no_init_parameters():
        vae = AutoencoderKL(**_vae_config("sdxl_base.json"))
    return {name: tuple(p.shape) for name, p in vae.parameters_and_names()}


def _randomize(cell, seed):
    """Random values for every parameter (norm weights too), so a block test exercises the affine terms."""
    rng = np.random.default_rng(seed)
    for _, p in cell.parameters_and_names():
        p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    return {name: p.asnumpy().astype(np.float64) for name, p in cell.parameters_and_names()}


# ---- independent numpy reference (float64) ----

def np_conv2d(x, w, b, stride=1, pad=(0, 0, 0, 0)):
    """Cross-correlation as torch's Conv2d; pad = (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
    kh, kw = w.shape[2:]
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out + b[None, :, None, None]


def np_group_norm(x, groups, weight, bias, eps=1e-6):
    g = x.reshape(x.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape) * weight[None, :, None, None] + bias[None, :, None, None]


def np_silu(x):
    return x / (1 + np.exp(-x))


# ---- layout ----

def test_sdxl_vae_parameter_count_and_names(sdxl_shapes):
    assert sum(int(np.prod(s)) for s in sdxl_shapes.values()) == 83_653_863
    assert SDXL_VAE_SCALE_FACTOR == 0.13025
    # spot checks of diffusers names and shapes (modern attention names, Linear weights)
    assert sdxl_shapes["encoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert sdxl_shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert sdxl_shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert sdxl_shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert sdxl_shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert sdxl_shapes["decoder.up_blocks.3.resnets.2.conv2.weight"] == (128, 128, 3, 3)
    assert sdxl_shapes["decoder.up_blocks.2.upsamplers.0.conv.weight"] == (256, 256, 3, 3)
    assert not any(k.startswith("encoder.down_blocks.3.downsamplers") for k in sdxl_shapes)
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in sdxl_shapes)


def test_sdxl_ldm_key_families(sdxl_shapes):
    # zero-stride views: the conversion sees real shapes without 330 MB of weights
    diffusers_sd = {k: np.broadcast_to(np.float32(0), s) for k, s in sdxl_shapes.items()}
    ldm = {k: v.shape for k, v in convert_vae_state_dict(diffusers_sd).items()}

    def count(pattern):
        return sum(1 for k in ldm if re.fullmatch(pattern, k))

    # 4 levels x 2 resnets in the encoder, 4 x 3 in the decoder
    assert count(r"encoder\.down\.\d\.block\.\d\.conv1\.weight") == 8
    assert count(r"decoder\.up\.\d\.block\.\d\.conv1\.weight") == 12
    # width changes 128->256, 256->512 (encoder) and 512->256, 256->128 (decoder): 4 shortcuts
    assert count(r".*\.nin_shortcut\.weight") == 4
    # no downsample after the last encoder level, no upsample at LDM decoder level 0 (the full-res one)
    assert count(r"encoder\.down\.\d\.downsample\.conv\.weight") == 3
    assert count(r"decoder\.up\.\d\.upsample\.conv\.weight") == 3
    assert "decoder.up.0.upsample.conv.weight" not in ldm
    assert count(r"(en|de)coder\.mid\.attn_1\.(norm|q|k|v|proj_out)\.weight") == 10
    # resnets: (8 + 12 + 2 mid x 2) x 8 tensors + 4 shortcuts x 2 = 200; samplers 6 x 2 = 12; attention 2 x 10 = 20;
    # conv_in/norm_out/conv_out x 2 sides x 2 = 12; quant_conv + post_quant_conv = 4 -> 248
    assert len(ldm) == 248
    # LDM decoder levels run the other way: up.0 is the 128-channel level fed by 256 channels
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert ldm["decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert ldm["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert ldm["encoder.norm_out.weight"] == (512,)


def test_ldm_roundtrip_tiny(tiny_vae):
    diffusers_sd = {name: p.asnumpy() for name, p in tiny_vae.parameters_and_names()}
    ldm = convert_vae_state_dict(diffusers_sd)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    back = convert_ldm_vae_checkpoint(ldm)
    assert set(back) == set(diffusers_sd)
    again = convert_vae_state_dict(back)
    assert set(again) == set(ldm)
    for key, value in ldm.items():
        assert again[key].shape == value.shape and np.array_equal(again[key], value), key
    for key, value in diffusers_sd.items():
        assert np.array_equal(back[key], value), key


def test_conversion_rejects_unknown_keys(tiny_vae):
    ldm = convert_vae_state_dict({name: p.asnumpy() for name, p in tiny_vae.parameters_and_names()})
    ldm["encoder.mid.attn_1.proj_in.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    ldm["first_stage_model.encoder.conv_in.weight"] = np.zeros((32, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"unknown LDM VAE keys \(2\): encoder\.mid\.attn_1\.proj_in\.weight, "
                                         r"first_stage_model\.encoder\.conv_in\.weight"):
        convert_ldm_vae_checkpoint(ldm)
    with pytest.raises(ValueError, match=r"unknown diffusers VAE keys \(1\): encoder\.mid_block\.attentions\.0\.query"):
        convert_vae_state_dict({"encoder.mid_block.attentions.0.query.weight": np.zeros((4, 4), np.float32)})


# ---- blocks against numpy ----

def test_resnet_block_matches_numpy():
    block = ResnetBlock2D(32, 64, groups=32)
    w = _randomize(block, 1)
    x = np.random.default_rng(2).normal(size=(2, 32, 8, 6))
    h = np_conv2d(np_silu(np_group_norm(x, 32, w["norm1.weight"], w["norm1.bias"])), w["conv1.weight"],
                  w["conv1.bias"], pad=(1, 1, 1, 1))
    h = np_conv2d(np_silu(np_group_norm(h, 32, w["norm2.weight"], w["norm2.bias"])), w["conv2.weight"],
                  w["conv2.bias"], pad=(1, 1, 1, 1))
    expected = np_conv2d(x, w["conv_shortcut.weight"], w["conv_shortcut.bias"]) + h
    out = block(ms.Tensor(x.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_mid_attention_matches_numpy():
    attn = Attention(64, groups=32)
    w = _randomize(attn, 3)
    x = np.random.default_rng(4).normal(size=(2, 64, 4, 3))
    t = np_group_norm(x, 32, w["group_norm.weight"], w["group_norm.bias"]).reshape(2, 64, 12).transpose(0, 2, 1)
    q, k, v = (t @ w[f"to_{n}.weight"].T + w[f"to_{n}.bias"] for n in "qkv")
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(64)  # one head of width C
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = (probs @ v) @ w["to_out.0.weight"].T + w["to_out.0.bias"]
    expected = x + o.transpose(0, 2, 1).reshape(x.shape)
    out = attn(ms.Tensor(x.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_down_and_upsample_match_numpy():
    # even sides, as in the model: the last stride-2 window then reads the padded bottom row / right column
    x = np.random.default_rng(5).normal(size=(1, 32, 8, 6))
    down = Downsample2D(32)
    w = _randomize(down, 6)
    # pad one row at the bottom and one column at the right only, then a stride-2 valid conv
    expected = np_conv2d(x, w["conv.weight"], w["conv.bias"], stride=2, pad=(0, 1, 0, 1))
    out = down(ms.Tensor(x.astype(np.float32))).asnumpy()
    assert out.shape == (1, 32, 4, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

    up = Upsample2D(32)
    w = _randomize(up, 7)
    expected = np_conv2d(x.repeat(2, axis=2).repeat(2, axis=3), w["conv.weight"], w["conv.bias"], pad=(1, 1, 1, 1))
    out = up(ms.Tensor(x.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ---- the tiny model end to end ----

class _EncodeDecode(nn.Cell):
    """What a graph-mode caller does: encode, sample the posterior, decode its mode (the mean)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, x):
        mean, logvar = self.vae.encode(x)
        return mean, logvar, sample_diagonal_gaussian(mean, logvar), self.vae.decode(mean)


@pytest.fixture(scope="module")
def tiny_runs(tiny_vae):
    """PyNative outputs once and GRAPH_MODE outputs of two calls, on the same weights and image."""
    x = ms.Tensor(np.random.default_rng(8).uniform(-1, 1, (1, 3, 64, 48)).astype(np.float32))
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    pynative = [t.asnumpy() for t in _EncodeDecode(tiny_vae)(x)]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph_cell = _EncodeDecode(tiny_vae)
        graph_1 = [t.asnumpy() for t in graph_cell(x)]
        graph_2 = [t.asnumpy() for t in graph_cell(x)]
    finally:
        ms.set_context(mode=previous_mode)
    return pynative, graph_1, graph_2


def test_tiny_shapes(tiny_runs):
    mean, logvar, sample, image = tiny_runs[0]
    assert mean.shape == logvar.shape == sample.shape == (1, 4, 8, 6)  # 8x downscale
    assert image.shape == (1, 3, 64, 48)


def test_graph_matches_pynative(tiny_runs):
    pynative, graph, _ = tiny_runs
    # fp32 end to end; the two modes may fuse/reorder ops differently, so allow float rounding only
    for name, i in (("mean", 0), ("logvar", 1), ("image", 3)):
        np.testing.assert_allclose(graph[i], pynative[i], rtol=1e-5, atol=1e-5, err_msg=name)


def test_graph_sampling_draws_fresh_noise(tiny_runs):
    _, (mean_1, logvar, sample_1, _), (mean_2, _, sample_2, _) = tiny_runs
    assert not np.allclose(sample_1, sample_2)  # frozen (compile-time) noise would repeat
    np.testing.assert_array_equal(mean_1, mean_2)  # the mode is deterministic
    # the noise is standard normal, scaled by the posterior's std
    z = (sample_1 - mean_1) / np.exp(0.5 * np.clip(logvar, -30, 20))
    assert abs(z.mean()) < 0.3 and 0.7 < z.std() < 1.3


def test_posterior_wrapper_eager(tiny_vae):
    x = ms.Tensor(np.random.default_rng(9).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
    posterior = DiagonalGaussianDistribution(*tiny_vae.encode(x))
    assert not np.allclose(posterior.sample().asnumpy(), posterior.sample().asnumpy())
    np.testing.assert_array_equal(posterior.mode().asnumpy(), posterior.mean.asnumpy())
    # as diffusers clamps logvar to [-30, 20]: a huge logvar must not overflow to inf
    wide = DiagonalGaussianDistribution(posterior.mean, posterior.logvar + 1e4)
    assert np.isfinite(wide.sample().asnumpy()).all()
