import functools
import json
import os

import mindspore as ms
import numpy as np
import pytest

from clip_numpy import openclip_text_forward, random_openclip_state_dict
from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.openclip_conversion import (convert_sdxl_text_encoder_2_checkpoint,
                                        convert_text_encoder_2_state_dict_to_sdxl)
from library.sdxl_text_encoding import SdxlTextEncoders, encode_tokens_sdxl
from library.sdxl_tokenize import SdxlTokenizeStrategy

EOS = 49407
CAPTIONS = ["a photo of a cat", " ".join(["a photo of a red cat"] * 20)]  # 5 and 120 tokens


def load_into(cell, state_dict):
    names = {n for n, _ in cell.parameters_and_names()}
    assert names == set(state_dict), (names ^ set(state_dict))
    for name, p in cell.parameters_and_names():
        assert p.shape == state_dict[name].shape, name
        p.set_data(ms.Tensor(state_dict[name]))


def first_eos(ids):
    return np.array([list(row).index(EOS) for row in ids])


@pytest.fixture(scope="module")
def setup():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_sdxl.json")) as f:
        cfg = json.load(f)
    c1, c2 = cfg["text_encoder_1"], cfg["text_encoder_2"]
    rng = np.random.default_rng(0)
    te1, te2 = CLIPTextModel(**c1), CLIPTextModelWithProjection(**c2)
    # both encoders get their weights through the OpenCLIP format, so numpy can run them from that format
    sd1 = random_openclip_state_dict(rng, c1["vocab_size"], c1["hidden_size"], c1["num_hidden_layers"],
                                     c1["intermediate_size"], 8)
    del sd1["text_projection"], sd1["logit_scale"]
    sd2 = random_openclip_state_dict(rng, c2["vocab_size"], c2["hidden_size"], c2["num_hidden_layers"],
                                     c2["intermediate_size"], c2["projection_dim"])
    load_into(te1, convert_sdxl_text_encoder_2_checkpoint(sd1)[0])
    load_into(te2, convert_sdxl_text_encoder_2_checkpoint(sd2)[0])
    return dict(cfg=cfg, te1=te1, te2=te2, sd1=sd1, sd2=sd2)


@functools.lru_cache(maxsize=None)
def tokens(max_length):
    ids1, ids2 = SdxlTokenizeStrategy(max_length).tokenize(CAPTIONS)
    return ms.Tensor(ids1), ms.Tensor(ids2)


def encode(setup, max_length):
    ids1, ids2 = tokens(max_length)
    outputs = encode_tokens_sdxl(setup["te1"], setup["te2"], ids1, ids2)
    return [o.asnumpy() for o in outputs], ids1.asnumpy(), ids2.asnumpy()


def test_shapes(setup):
    c1, c2 = setup["cfg"]["text_encoder_1"], setup["cfg"]["text_encoder_2"]
    (h1, h2, pool2), _, _ = encode(setup, None)
    assert h1.shape == (2, 77, c1["hidden_size"]) and h2.shape == (2, 77, c2["hidden_size"])
    assert pool2.shape == (2, c2["projection_dim"])
    (h1, h2, pool2), _, _ = encode(setup, 150)
    assert h1.shape == (2, 152, c1["hidden_size"]) and h2.shape == (2, 152, c2["hidden_size"])
    assert pool2.shape == (2, c2["projection_dim"])


def test_matches_openclip_numpy_and_projection_is_transposed(setup):
    """pool2 = open_clip's `x_eos @ text_projection`, computed in numpy from the OpenCLIP-format tensors."""
    heads = setup["cfg"]["text_encoder_2"]["num_attention_heads"]
    (h1, h2, pool2), ids1, ids2 = encode(setup, None)
    ids2 = ids2[:, 0]
    states2, final2 = openclip_text_forward(setup["sd2"], ids2, heads, "gelu")
    x_eos = final2[np.arange(2), first_eos(ids2)]
    projection = setup["sd2"]["text_projection"]  # [hidden, proj], as open_clip stores it
    np.testing.assert_allclose(pool2, x_eos @ projection, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h2, states2[-2], rtol=1e-4, atol=1e-4)  # penultimate, no ln_final
    # Kohya's untransposed copy would compute x_eos @ P.T: a different vector for a non-symmetric P
    assert np.abs(x_eos @ projection.T - pool2).max() > 0.1

    heads1 = setup["cfg"]["text_encoder_1"]["num_attention_heads"]
    states1, _ = openclip_text_forward(setup["sd1"], ids1[:, 0], heads1, "quick_gelu")
    np.testing.assert_allclose(h1, states1[-2], rtol=1e-4, atol=1e-4)


def test_pool2_uses_first_eos_not_the_highest_id(setup):
    # with an added token above 49407 (textual inversion), HF's pooling (position of the highest id) moves onto
    # that token; SDXL's pool2 must stay on the first EOS
    c2 = dict(setup["cfg"]["text_encoder_2"], vocab_size=49410)
    ms.set_seed(1)
    te2 = CLIPTextModelWithProjection(**c2)
    ids = np.array([[[49406, 49409, 320, EOS, EOS]]], np.int32)
    ids1 = np.where(ids > EOS, 320, ids)  # TE1 does not know the added token
    _, _, pool2 = encode_tokens_sdxl(setup["te1"], te2, ms.Tensor(ids1), ms.Tensor(ids))
    text_embeds, last, _ = te2(ms.Tensor(ids[0]))
    w = te2.text_projection.weight.asnumpy()
    last = last.asnumpy()
    np.testing.assert_allclose(pool2.asnumpy()[0], last[0, 3] @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text_embeds.asnumpy()[0], last[0, 1] @ w.T, rtol=1e-5, atol=1e-5)
    assert np.abs(last[0, 3] - last[0, 1]).max() > 1e-3


def test_window_reassembly(setup):
    te1, te2 = setup["te1"], setup["te2"]
    (h1, h2, pool2), ids1, ids2 = encode(setup, 150)
    flat1, flat2 = ids1.reshape(4, 77), ids2.reshape(4, 77)
    s1 = te1.text_model(ms.Tensor(flat1))[2][-2].asnumpy().reshape(2, 2, 77, -1)
    last2, _, states2 = te2.text_model(ms.Tensor(flat2))
    s2 = states2[-2].asnumpy().reshape(2, 2, 77, -1)
    for got, s in ((h1, s1), (h2, s2)):
        manual = np.concatenate([s[:, 0, :1], s[:, 0, 1:76], s[:, 1, 1:76], s[:, 1, 76:]], axis=1)
        assert manual.shape[1] == 152
        np.testing.assert_allclose(got, manual, rtol=1e-6, atol=1e-6)
    # pool2 comes from each caption's first window
    last2 = last2.asnumpy().reshape(2, 2, 77, -1)[:, 0]
    eos = first_eos(flat2[[0, 2]])
    expected = last2[np.arange(2), eos] @ te2.text_projection.weight.asnumpy().T
    np.testing.assert_allclose(pool2, expected, rtol=1e-5, atol=1e-5)


def test_graph_mode_matches_pynative_and_is_deterministic(setup):
    ids1, ids2 = tokens(150)
    cell = SdxlTextEncoders(setup["te1"], setup["te2"])
    eager = [o.asnumpy() for o in cell(ids1, ids2)]
    eager_again = [o.asnumpy() for o in cell(ids1, ids2)]
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = [o.asnumpy() for o in cell(ids1, ids2)]
        graph_again = [o.asnumpy() for o in cell(ids1, ids2)]
    finally:
        ms.set_context(mode=previous_mode)
    for e, e2, g, g2 in zip(eager, eager_again, graph, graph_again):
        np.testing.assert_array_equal(e, e2)
        np.testing.assert_array_equal(g, g2)
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_te2_conversion_round_trip_and_errors(setup):
    sd = setup["sd2"]
    with_ids = dict(sd, **{"text_model.embeddings.position_ids": np.arange(77)[None]})  # as ComfyUI saves
    hf_sd, logit_scale = convert_sdxl_text_encoder_2_checkpoint(with_ids)
    assert float(logit_scale) == float(sd["logit_scale"])
    assert "text_model.embeddings.position_ids" not in hf_sd
    np.testing.assert_array_equal(hf_sd["text_projection.weight"], sd["text_projection"].T)
    np.testing.assert_array_equal(hf_sd["text_model.encoder.layers.1.self_attn.k_proj.bias"],
                                  np.split(sd["transformer.resblocks.1.attn.in_proj_bias"], 3)[1])
    back = convert_text_encoder_2_state_dict_to_sdxl(hf_sd, logit_scale)
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])
    assert "logit_scale" not in convert_text_encoder_2_state_dict_to_sdxl(hf_sd)

    # Playground v2 stores the projection as a Linear weight, already in HF orientation
    playground = {k: v for k, v in sd.items() if k != "text_projection"}
    playground["text_projection.weight"] = sd["text_projection"].T
    np.testing.assert_array_equal(convert_sdxl_text_encoder_2_checkpoint(playground)[0]["text_projection.weight"],
                                  sd["text_projection"].T)

    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn\.bogus.*visual\.proj"):
        convert_sdxl_text_encoder_2_checkpoint(dict(sd, **{"transformer.resblocks.0.attn.bogus": 0, "visual.proj": 0}))
    with pytest.raises(ValueError, match="text_model.encoder.layers.0.self_attn.v_proj.weight"):
        convert_text_encoder_2_state_dict_to_sdxl(
            {k: v for k, v in hf_sd.items() if k != "text_model.encoder.layers.0.self_attn.v_proj.weight"})
    with pytest.raises(ValueError, match="text_model.foo"):
        convert_text_encoder_2_state_dict_to_sdxl(dict(hf_sd, **{"text_model.foo": 0}))
