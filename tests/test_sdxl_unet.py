"""SDXL UNet: checkpoint key layout, parameter count, numerics of its blocks, graph mode, conditioning."""

import json
import math
import os
import re
from collections import Counter

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from library.sdxl_original_unet import (SDXL_BASE_UNET_CONFIG, BasicTransformerBlock, SdxlUNet2DConditionModel,
                                        Upsample2D, timestep_embedding)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module", autouse=True)
def synchronous_pynative():
    # asynchronous PyNative dispatch is ~10x slower on CPU (DESIGN.md)
    previous = ms.get_context("pynative_synchronize")
    ms.set_context(pynative_synchronize=True)
    yield
    ms.set_context(pynative_synchronize=previous)


def load_config(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)["unet"]


@pytest.fixture(scope="module")
def sdxl_unet():
    with no_init_parameters():  # shapes only: the 2.6B weights are never allocated
        return SdxlUNet2DConditionModel()


@pytest.fixture(scope="module")
def sdxl_shapes(sdxl_unet):
    return {name: tuple(p.shape) for name, p in sdxl_unet.parameters_and_names()}


def test_sdxl_base_parameter_count(sdxl_shapes):
    assert sum(math.prod(s) for s in sdxl_shapes.values()) == 2_567_463_684


def test_sdxl_base_config_file_is_the_default():
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in load_config("sdxl_base.json").items()}
    assert config == SDXL_BASE_UNET_CONFIG


def test_sdxl_base_key_families(sdxl_shapes):
    keys = set(sdxl_shapes)
    # By hand from the SDXL architecture (channels 320/640/1280, 2 res blocks per level, depths 0/2/10):
    # - transformer blocks: input 2x2 + 2x10, middle 10, output 3x10 + 3x2 = 24 + 10 + 36 = 70
    # - Transformer2DModels: input 2+2, middle 1, output 3+3 = 11
    # - resnets: input 2+2+2, middle 2, output 3+3+3 = 17; with a 1x1 skip conv where channels change:
    #   input_blocks 4 (320->640) and 7 (640->1280), plus all 9 output resnets (they take skip-concatenated
    #   input) = 11
    # - downsamplers after levels 0 and 1 = 2; upsamplers after output levels 2 and 1 = 2
    # - keys: 17 resnets x 10 + 11 skips x 2 + 70 blocks x 20 + 11 transformers x 6 + 4 down/up x 2
    #   + time_embed 4 + label_emb 4 + conv_in 2 + out 4 = 1680
    def count(pattern):
        return sum(1 for k in keys if re.fullmatch(pattern, k))

    assert count(r".*\.transformer_blocks\.\d+\.attn1\.to_q\.weight") == 70
    assert count(r".*\.proj_in\.weight") == 11
    assert count(r".*\.in_layers\.2\.weight") == 17
    assert count(r".*\.skip_connection\.weight") == 11
    assert count(r"input_blocks\.\d+\.0\.op\.weight") == 2
    assert count(r"output_blocks\.\d+\.2\.conv\.weight") == 2
    assert len(keys) == 1680
    assert not any(re.search(r"to_[qkv]\.bias$", k) for k in keys)
    expected_shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.bias": (1280,),
        "label_emb.0.0.weight": (1280, 2816),
        "label_emb.0.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.0.weight": (320,),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.4.1.norm.weight": (640,),
        "input_blocks.4.1.proj_in.weight": (640, 640),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": (640, 640),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.bias": (640,),
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight": (5120, 640),
        "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (640, 2560),
        "input_blocks.4.1.transformer_blocks.0.norm3.bias": (640,),
        "input_blocks.4.1.proj_out.weight": (640, 640),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
        "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.transformer_blocks.9.norm1.weight": (1280,),
        "middle_block.2.out_layers.3.bias": (1280,),
        "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: sdxl_shapes.get(k) for k in expected_shapes} == expected_shapes


def test_lora_targets_by_class_name(sdxl_unet):
    # Kohya's LoRA finds Linear/Conv cells inside cells of these class names and swaps them in place: SDXL has
    # 722 such modules in Transformer2DModels, 788 when conv layers of resnets/down/upsamplers are added.
    def targets(class_names):
        found = set()
        for name, cell in sdxl_unet.cells_and_names():
            if type(cell).__name__ in class_names:
                found |= {f"{name}.{child_name}" for child_name, child in cell.cells_and_names()
                          if type(child) in (nn.Dense, nn.Conv2d)}
        return found

    assert len(targets({"Transformer2DModel"})) == 722
    assert len(targets({"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"})) == 788
    classes = Counter(type(cell).__name__ for _, cell in sdxl_unet.cells_and_names())
    assert (classes["BasicTransformerBlock"], classes["CrossAttention"], classes["FeedForward"], classes["GEGLU"]) \
        == (70, 140, 70, 70)


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="attention_head_dim"):
        SdxlUNet2DConditionModel.from_config({"attention_head_dim": 64})


def test_timestep_embedding_matches_numpy():
    t = np.array([0, 1, 17, 999], dtype=np.float32)
    dim = 320
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_embedding(ms.Tensor(t), dim).asnumpy()
    assert got.shape == (4, dim)
    # t * f is formed in fp32 (as torch does): at t=999 its rounding moves the phase by up to ~6e-5 rad
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _numpy_basic_transformer_block(block, x, context):
    """BasicTransformerBlock computed from its weights in float64: pre-LN attention x2, GEGLU feed-forward."""
    w = {name: p.asnumpy().astype(np.float64) for name, p in block.parameters_and_names()}
    heads = block.attn1.heads

    def layer_norm(h, name):
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        return (h - mean) / np.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def attend(h, ctx, name):
        q, k, v = (t @ w[f"{name}.to_{n}.weight"].T for t, n in ((h, "q"), (ctx, "k"), (ctx, "v")))
        b, lq, c = q.shape
        d = c // heads
        split = lambda t: t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, lq, c)
        return out @ w[f"{name}.to_out.0.weight"].T + w[f"{name}.to_out.0.bias"]

    erf = np.vectorize(math.erf)
    x = attend(layer_norm(x, "norm1"), layer_norm(x, "norm1"), "attn1") + x
    x = attend(layer_norm(x, "norm2"), context, "attn2") + x
    h = layer_norm(x, "norm3") @ w["ff.net.0.proj.weight"].T + w["ff.net.0.proj.bias"]
    value, gate = np.split(h, 2, axis=-1)
    h = value * 0.5 * gate * (1 + erf(gate / np.sqrt(2)))
    return h @ w["ff.net.2.weight"].T + w["ff.net.2.bias"] + x


def test_basic_transformer_block_matches_numpy():
    ms.set_seed(3)
    block = BasicTransformerBlock(dim=32, heads=2, dim_head=16, context_dim=24)
    # spread the gates over +-3, where erf-gelu and its tanh approximation differ by up to ~1e-3
    proj = block.ff.net[0].proj.weight
    proj.set_data(proj * 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 32)).astype(np.float32)
    context = rng.standard_normal((2, 5, 24)).astype(np.float32)
    got = block(ms.Tensor(x), ms.Tensor(context)).asnumpy()
    expected = _numpy_basic_transformer_block(block, x.astype(np.float64), context.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _tiny_unet(seed=0):
    ms.set_seed(seed)
    return SdxlUNet2DConditionModel.from_config(load_config("tiny_sdxl.json"))


def _tiny_inputs(seed=0, batch=2, h=16, w=24, tokens=77):
    cfg = load_config("tiny_sdxl.json")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg["in_channels"], h, w)).astype(np.float32)
    t = np.array([10, 500][:batch], dtype=np.int32)
    context = rng.standard_normal((batch, tokens, cfg["context_dim"])).astype(np.float32)
    y = rng.standard_normal((batch, cfg["adm_in_channels"])).astype(np.float32)
    return [ms.Tensor(a) for a in (x, t, context, y)]


@pytest.fixture(scope="module")
def tiny_runs():
    """Outputs of one tiny UNet in graph mode (one compile, reused for every call) and in PyNative mode."""
    unet = _tiny_unet()
    x, t, context, y = _tiny_inputs()
    context2, y2 = _tiny_inputs(seed=1)[2:]
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = {
            "base": unet(x, t, context, y).asnumpy(),
            "again": unet(x, t, context, y).asnumpy(),
            "context": unet(x, t, context2, y).asnumpy(),
            "y": unet(x, t, context, y2).asnumpy(),
        }
    finally:
        ms.set_context(mode=previous_mode)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        pynative = unet(x, t, context, y).asnumpy()
    finally:
        ms.set_context(mode=previous_mode)
    return graph, pynative


def test_tiny_unet_graph_mode_matches_pynative(tiny_runs):
    graph, pynative = tiny_runs
    assert graph["base"].shape == (2, 4, 16, 24)
    assert np.isfinite(graph["base"]).all() and graph["base"].std() > 1e-3
    # same kernels in both modes; only op fusion could reorder fp32 sums
    np.testing.assert_allclose(graph["base"], pynative, rtol=1e-5, atol=1e-5)


def test_tiny_unet_is_deterministic(tiny_runs):
    graph, _ = tiny_runs
    np.testing.assert_array_equal(graph["again"], graph["base"])
    first, second, other = _tiny_unet(seed=5), _tiny_unet(seed=5), _tiny_unet(seed=6)
    first_params = {n: p.asnumpy() for n, p in first.parameters_and_names()}
    second_params = {n: p.asnumpy() for n, p in second.parameters_and_names()}
    assert first_params.keys() == second_params.keys()
    for name in first_params:
        np.testing.assert_array_equal(first_params[name], second_params[name], err_msg=name)
    assert not np.array_equal(first_params["out.2.weight"], other.out[2].weight.asnumpy())


def test_tiny_unet_output_depends_on_context_and_y(tiny_runs):
    graph, _ = tiny_runs
    assert np.abs(graph["context"] - graph["base"]).max() > 1e-4
    assert np.abs(graph["y"] - graph["base"]).max() > 1e-4


def test_gradient_checkpointing_keeps_gradients():
    x, t, context, y = (a[:1] for a in _tiny_inputs(h=8, w=8, tokens=5))

    def grads(unet):
        params = unet.trainable_params()
        loss = lambda *args: (unet(*args) ** 2).mean()  # noqa: E731
        return ms.value_and_grad(loss, None, params)(x, t, context, y)[1]

    plain, checkpointed = _tiny_unet(), _tiny_unet()
    checkpointed.set_gradient_checkpointing(True)
    for g_plain, g_ckpt in zip(grads(plain), grads(checkpointed)):
        np.testing.assert_allclose(g_ckpt.asnumpy(), g_plain.asnumpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="cannot be switched off"):
        checkpointed.set_gradient_checkpointing(False)


def test_flash_attention_is_refused_off_ascend():
    unet = _tiny_unet()
    assert unet.set_use_flash_attention(True) is False
    assert not unet.input_blocks[4][1].transformer_blocks[0].attn2.use_flash_attention


def test_upsample_is_nearest_neighbour():
    up = Upsample2D(3)
    identity = np.zeros((3, 3, 3, 3), np.float32)
    identity[np.arange(3), np.arange(3), 1, 1] = 1  # 3x3 kernel that copies each channel
    up.conv.weight.set_data(ms.Tensor(identity))
    up.conv.bias.set_data(ms.Tensor(np.zeros(3, np.float32)))
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(up(ms.Tensor(x)).asnumpy(), x.repeat(2, axis=2).repeat(2, axis=3))


def test_single_timestep_is_broadcast_to_batch():
    unet = _tiny_unet()
    x, t, context, y = _tiny_inputs(h=8, w=8, tokens=5)
    shared = unet(x, t[:1], context, y).asnumpy()
    per_sample = unet(x, ms.Tensor(np.full(2, t[0].asnumpy(), np.int32)), context, y).asnumpy()
    np.testing.assert_array_equal(shared, per_sample)
