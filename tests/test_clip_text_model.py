import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from clip_numpy import activation, causal_self_attention, layer_norm
from library.clip_text_model import CLIPEncoderLayer, CLIPMLP, CLIPTextModel, CLIPTextModelWithProjection

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


def count_parameters(model):
    return sum(int(np.prod(p.shape)) for _, p in model.parameters_and_names())


def np_params(cell):
    return {name: p.asnumpy() for name, p in cell.parameters_and_names()}


def randomize(cell, seed):
    """Give every parameter non-trivial random values (LayerNorms start at 1/0 otherwise)."""
    rng = np.random.default_rng(seed)
    for _, p in cell.parameters_and_names():
        p.set_data(ms.Tensor((rng.standard_normal(p.shape) * 0.3).astype(np.float32)))


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny_sdxl.json")
    ms.set_seed(0)
    te1, te2 = CLIPTextModel(**cfg["text_encoder_1"]), CLIPTextModelWithProjection(**cfg["text_encoder_2"])
    randomize(te1, 1)
    randomize(te2, 2)
    return cfg, te1, te2


def test_sdxl_parameter_counts_without_allocating():
    cfg = load_config("sdxl_base.json")
    with no_init_parameters():
        te1 = CLIPTextModel(**cfg["text_encoder_1"])
        te2 = CLIPTextModelWithProjection(**cfg["text_encoder_2"])
    assert count_parameters(te1) == 123_060_480
    assert count_parameters(te2) == 694_659_840


def test_parameter_names_are_hf_names(tiny):
    cfg, te1, te2 = tiny
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
             "mlp.fc1", "mlp.fc2", "layer_norm2"]
    expected = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(cfg["text_encoder_1"]["num_hidden_layers"]):
        expected += [f"text_model.encoder.layers.{i}.{m}.{w}" for m in layer for w in ("weight", "bias")]
    expected += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    assert [n for n, _ in te1.parameters_and_names()] == expected
    assert [n for n, _ in te2.parameters_and_names()] == expected + ["text_projection.weight"]
    te2_cfg = cfg["text_encoder_2"]
    assert te2.text_projection.weight.shape == (te2_cfg["projection_dim"], te2_cfg["hidden_size"])
    assert te2.text_projection.bias is None


def test_lora_targets_are_plain_dense_attributes(tiny):
    _, te1, _ = tiny
    layer = te1.text_model.encoder.layers[0]
    assert type(layer.self_attn).__name__ == "CLIPAttention" and type(layer.mlp).__name__ == "CLIPMLP"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert type(getattr(layer.self_attn, name)) is nn.Dense
    for name in ("fc1", "fc2"):
        assert type(getattr(layer.mlp, name)) is nn.Dense


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_encoder_layer_matches_numpy(act):
    hidden, heads, inter, length = 16, 4, 24, 7
    layer = CLIPEncoderLayer(hidden, inter, heads, act, 1e-5)
    randomize(layer, 3)
    x = np.random.default_rng(4).standard_normal((2, length, hidden)).astype(np.float32)
    mask = ms.Tensor(np.triu(np.full((length, length), -1e9, np.float32), k=1)[None, None])
    out = layer(ms.Tensor(x), mask).asnumpy()

    p = np_params(layer)
    h = layer_norm(x, p["layer_norm1.weight"], p["layer_norm1.bias"])
    a = [p[f"self_attn.{n}_proj.{w}"] for n in ("q", "k", "v", "out") for w in ("weight", "bias")]
    y = x + causal_self_attention(h, *a, heads)
    h = layer_norm(y, p["layer_norm2.weight"], p["layer_norm2.bias"])
    y = y + activation(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"], act) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def test_activations_differ_as_configured():
    # quick_gelu and exact gelu must really be different functions, or the parametrised test above proves little
    mlp_q, mlp_g = CLIPMLP(4, 8, "quick_gelu"), CLIPMLP(4, 8, "gelu")
    for name, p in mlp_q.parameters_and_names():
        dict(mlp_g.parameters_and_names())[name].set_data(p.data.copy())
    x = ms.Tensor(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4))
    assert np.abs(mlp_q(x).asnumpy() - mlp_g(x).asnumpy()).max() > 1e-3
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPMLP(4, 8, "relu")


def test_model_outputs_structure_and_pooling(tiny):
    cfg, te1, te2 = tiny
    ids = np.array([[49406, 320, 1125, 49407, 49407, 49407, 49407],
                    [49406, 2368, 539, 320, 2368, 49407, 0]], np.int32)
    last, pooled, states = te1(ms.Tensor(ids))
    p = np_params(te1)
    assert len(states) == cfg["text_encoder_1"]["num_hidden_layers"] + 1
    emb = (p["text_model.embeddings.token_embedding.weight"][ids]
           + p["text_model.embeddings.position_embedding.weight"][:7])
    np.testing.assert_allclose(states[0].asnumpy(), emb, rtol=1e-5, atol=1e-5)
    expected_last = layer_norm(states[-1].asnumpy(), p["text_model.final_layer_norm.weight"],
                               p["text_model.final_layer_norm.bias"])
    np.testing.assert_allclose(last.asnumpy(), expected_last, rtol=1e-4, atol=1e-4)
    # HF pooling: the first position holding the highest id (the first EOS here)
    np.testing.assert_allclose(pooled.asnumpy(), expected_last[[0, 1], [3, 5]], rtol=1e-6, atol=1e-6)

    embeds, last2, states2 = te2(ms.Tensor(ids))
    pooled2 = te2.text_model(ms.Tensor(ids))[1].asnumpy()
    expected_embeds = pooled2 @ te2.text_projection.weight.asnumpy().T
    np.testing.assert_allclose(embeds.asnumpy(), expected_embeds, rtol=1e-5, atol=1e-5)
    assert last2.shape == (2, 7, cfg["text_encoder_2"]["hidden_size"]) and len(states2) == len(states)


def test_causal_mask_hides_later_tokens(tiny):
    _, te1, _ = tiny
    a = np.array([[49406, 320, 1125, 539, 320, 2368, 49407]], np.int32)
    b = a.copy()
    b[0, 4:] = [1125, 1125, 1125]
    out_a, out_b = te1(ms.Tensor(a))[0].asnumpy(), te1(ms.Tensor(b))[0].asnumpy()
    np.testing.assert_allclose(out_a[:, :4], out_b[:, :4], rtol=1e-6, atol=1e-6)
    assert np.abs(out_a[:, 4:] - out_b[:, 4:]).max() > 1e-3


def test_gradient_checkpointing_switch():
    cfg = load_config("tiny_sdxl.json")["text_encoder_1"]
    te = CLIPTextModel(**cfg)
    ids = ms.Tensor(np.array([[49406, 320, 2368, 49407]], np.int32))
    before = te(ids)[0].asnumpy()
    te.set_gradient_checkpointing(False)  # off while off: nothing to do
    te.set_gradient_checkpointing(True)
    assert te.gradient_checkpointing
    assert all(layer._recompute_cell is not None for layer in te.text_model.encoder.layers)
    np.testing.assert_array_equal(te(ids)[0].asnumpy(), before)
    with pytest.raises(ValueError, match="cannot be switched off"):
        te.set_gradient_checkpointing(False)
