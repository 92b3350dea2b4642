"""SD 1.x / 2.x UNet: parameter counts and layout, its blocks against numpy, graph mode against PyNative."""

import json
import math
import os
from collections import Counter

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from library.original_unet import SD_V1_UNET_CONFIG, ResnetBlock2D, UNet2DConditionModel, Upsample2D
from library.sdxl_original_unet import Transformer2DModel

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def unet_config(name):
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        return json.load(f)["unet"]


@pytest.fixture(scope="module")
def full_unets():
    with no_init_parameters():  # shapes only: nothing is allocated
        return {name: UNet2DConditionModel.from_config(unet_config(name)) for name in ("sd_v1", "sd_v2")}


def test_sd_v1_config_file_is_the_default():
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_config("sd_v1").items()}
    assert config == SD_V1_UNET_CONFIG


def test_parameter_counts_and_layout(full_unets):
    shapes = {name: {k: tuple(p.shape) for k, p in unet.parameters_and_names()} for name, unet in full_unets.items()}
    assert sum(math.prod(s) for s in shapes["sd_v1"].values()) == 859_520_964
    assert sum(math.prod(s) for s in shapes["sd_v2"].values()) == 865_910_724
    # diffusers' SD 1.5 / 2.1 UNets both have 686 tensors
    assert len(shapes["sd_v1"]) == len(shapes["sd_v2"]) == 686
    expected_v1 = {
        "conv_in.weight": (320, 4, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "time_embedding.linear_2.bias": (1280,),
        "down_blocks.0.resnets.0.time_emb_proj.weight": (320, 1280),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "down_blocks.0.downsamplers.0.conv.weight": (320, 320, 3, 3),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
        "down_blocks.3.resnets.1.conv2.weight": (1280, 1280, 3, 3),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (1280, 1280),
        "mid_block.resnets.1.norm2.weight": (1280,),
        "up_blocks.0.resnets.0.conv1.weight": (1280, 2560, 3, 3),
        "up_blocks.0.upsamplers.0.conv.weight": (1280, 1280, 3, 3),
        "up_blocks.1.resnets.2.conv1.weight": (1280, 1920, 3, 3),
        "up_blocks.2.resnets.0.conv_shortcut.weight": (640, 1920, 1, 1),
        "up_blocks.3.attentions.2.proj_out.weight": (320, 320, 1, 1),
        "up_blocks.3.resnets.2.conv1.weight": (320, 640, 3, 3),
        "conv_norm_out.weight": (320,),
        "conv_out.weight": (4, 320, 3, 3),
    }
    assert {k: shapes["sd_v1"].get(k) for k in expected_v1} == expected_v1
    assert not any(k.startswith(("down_blocks.3.attentions", "up_blocks.0.attentions", "up_blocks.3.upsamplers"))
                   for k in shapes["sd_v1"])
    expected_v2 = {
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320),
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v.weight": (1280, 1024),
        "up_blocks.3.attentions.2.proj_out.weight": (320, 320),
    }
    assert {k: shapes["sd_v2"].get(k) for k in expected_v2} == expected_v2
    heads = {name: [unet.down_blocks[i].attentions[0].transformer_blocks[0].attn1.heads for i in range(3)]
             + [unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads] for name, unet in full_unets.items()}
    assert heads == {"sd_v1": [8, 8, 8, 8], "sd_v2": [5, 10, 20, 20]}


def test_lora_targets_by_class_name(full_unets):
    # upstream's SD 1.5 LoRA: 192 UNet modules in Transformer2DModels (160 Linear + 32 conv 1x1 proj_in/out), 278
    # with the resnets' and resamplers' convs (conv_dim)
    def targets(unet, class_names):
        found = Counter()
        for name, cell in unet.cells_and_names():
            if type(cell).__name__ in class_names:
                for child_name, child in cell.cells_and_names():
                    if type(child) in (nn.Dense, nn.Conv2d):
                        found[type(child).__name__] += 1
        return found

    assert targets(full_unets["sd_v1"], {"Transformer2DModel"}) == {"Dense": 160, "Conv2d": 32}
    assert targets(full_unets["sd_v2"], {"Transformer2DModel"}) == {"Dense": 192}
    conv_classes = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    assert sum(targets(full_unets["sd_v1"], conv_classes).values()) == 278


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown SD UNet config keys: \['model_channels'\]"):
        UNet2DConditionModel.from_config({"model_channels": 320})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel(block_out_channels=(32, 64), attention_head_dim=[2, 2, 2], norm_num_groups=32)


# ---- numpy references (float64) ----

def _group_norm(x, weight, bias, groups, eps):
    b, c = x.shape[:2]
    h = x.reshape(b, groups, -1)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
    return h.reshape(x.shape) * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def _conv2d(x, weight, bias, padding):
    k = weight.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    h, w = x.shape[2] - k + 1, x.shape[3] - k + 1
    patches = np.stack([x[:, :, i:i + h, j:j + w] for i in range(k) for j in range(k)], axis=-1)  # B,C,H,W,k*k
    return np.einsum("bchwk,ock->bohw", patches, weight.reshape(*weight.shape[:2], -1)) + bias.reshape(1, -1, 1, 1)


def _silu(x):
    return x / (1 + np.exp(-x))


def _weights(cell):
    return {name: p.asnumpy().astype(np.float64) for name, p in cell.parameters_and_names()}


def test_resnet_block_matches_numpy():
    ms.set_seed(1)
    block = ResnetBlock2D(32, 64, temb_channels=24, groups=8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 5, 6)).astype(np.float32)
    temb = rng.standard_normal((2, 24)).astype(np.float32)
    got = block(ms.Tensor(x), ms.Tensor(temb)).asnumpy()
    w = _weights(block)
    h = _silu(_group_norm(x, w["norm1.weight"], w["norm1.bias"], 8, 1e-5))
    h = _conv2d(h, w["conv1.weight"], w["conv1.bias"], 1)
    h = h + (_silu(temb) @ w["time_emb_proj.weight"].T + w["time_emb_proj.bias"])[:, :, None, None]
    h = _silu(_group_norm(h, w["norm2.weight"], w["norm2.bias"], 8, 1e-5))
    h = _conv2d(h, w["conv2.weight"], w["conv2.bias"], 1)
    expected = _conv2d(x.astype(np.float64), w["conv_shortcut.weight"], w["conv_shortcut.bias"], 0) + h
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _numpy_transformer(w, x, context, heads, linear):
    """Transformer2DModel of depth 1: GroupNorm(32, eps 1e-6), projection, pre-LN self/cross attention and GEGLU."""
    b, c, hh, ww = x.shape

    def project(t, name):  # tokens (B, L, C); a 1x1 conv is the same matrix on every position
        weight = w[f"{name}.weight"].reshape(c, c)
        return t @ weight.T + w[f"{name}.bias"]

    def layer_norm(t, name):
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
        return t * w[f"{name}.weight"] + w[f"{name}.bias"]

    def attend(t, ctx, name):
        q, k, v = (a @ w[f"{name}.to_{n}.weight"].T for a, n in ((t, "q"), (ctx, "k"), (ctx, "v")))
        d = c // heads
        split = lambda a: a.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, -1, c)
        return out @ w[f"{name}.to_out.0.weight"].T + w[f"{name}.to_out.0.bias"]

    erf = np.vectorize(math.erf)
    assert w["proj_in.weight"].ndim == (2 if linear else 4)
    tokens = _group_norm(x, w["norm.weight"], w["norm.bias"], 32, 1e-6).transpose(0, 2, 3, 1).reshape(b, -1, c)
    t = project(tokens, "proj_in")
    blk = "transformer_blocks.0"
    t = attend(layer_norm(t, f"{blk}.norm1"), layer_norm(t, f"{blk}.norm1"), f"{blk}.attn1") + t
    t = attend(layer_norm(t, f"{blk}.norm2"), context, f"{blk}.attn2") + t
    g = layer_norm(t, f"{blk}.norm3") @ w[f"{blk}.ff.net.0.proj.weight"].T + w[f"{blk}.ff.net.0.proj.bias"]
    value, gate = np.split(g, 2, axis=-1)
    g = value * 0.5 * gate * (1 + erf(gate / np.sqrt(2)))
    t = g @ w[f"{blk}.ff.net.2.weight"].T + w[f"{blk}.ff.net.2.bias"] + t
    t = project(t, "proj_out")
    return t.reshape(b, hh, ww, c).transpose(0, 3, 1, 2) + x


@pytest.mark.parametrize("linear", [False, True], ids=["sd1_conv_projection", "sd2_linear_projection"])
def test_transformer2d_matches_numpy(linear):
    ms.set_seed(2)
    transformer = Transformer2DModel(64, heads=2, dim_head=32, depth=1, context_dim=24, num_groups=32,
                                     use_linear_projection=linear)
    assert type(transformer.proj_in) is (nn.Dense if linear else nn.Conv2d)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 64, 3, 5)).astype(np.float32)
    context = rng.standard_normal((2, 7, 24)).astype(np.float32)
    got = transformer(ms.Tensor(x), ms.Tensor(context)).asnumpy()
    expected = _numpy_transformer(_weights(transformer), x.astype(np.float64), context.astype(np.float64), 2, linear)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_upsample_crops_to_the_skip_like_torch_nearest():
    up = Upsample2D(2)
    identity = np.zeros((2, 2, 3, 3), np.float32)
    identity[np.arange(2), np.arange(2), 1, 1] = 1  # a 3x3 kernel that copies each channel
    up.conv.weight.set_data(ms.Tensor(identity))
    up.conv.bias.set_data(ms.Tensor(np.zeros(2, np.float32)))
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    skip = ms.Tensor(np.zeros((1, 2, 5, 8), np.float32))  # 5 = an odd size that downsampled to 3
    got = up(ms.Tensor(x), skip).asnumpy()
    # torch's F.interpolate(size=(5, 8), mode="nearest") reads source index floor(i * in / out)
    rows, cols = (np.arange(5) * 3) // 5, (np.arange(8) * 4) // 8
    np.testing.assert_array_equal(got, x[:, :, rows][:, :, :, cols])


# ---- the whole tiny UNet ----

def _tiny_unet(name, seed=0):
    ms.set_seed(seed)
    return UNet2DConditionModel.from_config(unet_config(name))


def _tiny_inputs(h=10, w=12, batch=2, tokens=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, h, w)).astype(np.float32)
    t = np.array([10, 500][:batch], np.int32)
    context = rng.standard_normal((batch, tokens, 32)).astype(np.float32)
    return [ms.Tensor(a) for a in (x, t, context)]


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
def test_tiny_unet_graph_mode_matches_pynative(name):
    # 10 x 12 latents: odd sizes at the lowest level, so the upsamplers crop
    unet = _tiny_unet(name)
    x, t, context = _tiny_inputs()
    pynative = unet(x, t, context).asnumpy()
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = unet(x, t, context).asnumpy()
        other_context = unet(x, t, _tiny_inputs(seed=1)[2]).asnumpy()
    finally:
        ms.set_context(mode=previous)
    assert graph.shape == (2, 4, 10, 12)
    assert np.isfinite(graph).all() and graph.std() > 1e-2
    np.testing.assert_allclose(graph, pynative, rtol=1e-5, atol=1e-5)
    assert np.abs(other_context - graph).max() > 1e-3  # the text conditioning reaches the output


def test_gradient_checkpointing_keeps_gradients():
    x, t, context = (a[:1] for a in _tiny_inputs(h=8, w=8, tokens=3))

    def grads(unet):
        loss = lambda *args: (unet(*args) ** 2).mean()  # noqa: E731
        return ms.value_and_grad(loss, None, unet.trainable_params())(x, t, context)[1]

    plain, checkpointed = _tiny_unet("tiny_sd1"), _tiny_unet("tiny_sd1")
    checkpointed.set_gradient_checkpointing(True)
    for g_plain, g_ckpt in zip(grads(plain), grads(checkpointed)):
        np.testing.assert_allclose(g_ckpt.asnumpy(), g_plain.asnumpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="cannot be switched off"):
        checkpointed.set_gradient_checkpointing(False)


def test_single_timestep_is_broadcast_to_batch():
    unet = _tiny_unet("tiny_sd2")
    x, t, context = _tiny_inputs(h=8, w=8, tokens=3)
    shared = unet(x, t[:1], context).asnumpy()
    per_sample = unet(x, ms.Tensor(np.full(2, 10, np.int32)), context).asnumpy()
    np.testing.assert_array_equal(shared, per_sample)
