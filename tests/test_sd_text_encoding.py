"""SD 1.x / 2.x tokenization and text conditioning against numpy (tests/clip_numpy.py) and expected id lists."""

import json

import mindspore as ms
import numpy as np
import pytest

from clip_numpy import layer_norm, openclip_text_forward, random_openclip_state_dict
from library.clip_text_model import CLIPTextModel
from library.openclip_conversion import convert_sdxl_text_encoder_2_checkpoint
from library.sd_text_encoding import SdTextEncoder, encode_tokens_sd
from library.sd_tokenize import SdTokenizeStrategy

BOS, EOS = 49406, 49407
A, PHOTO, OF, CAT = 320, 1125, 539, 2368
CAT_PHOTO = [A, PHOTO, OF, A, CAT]  # "a photo of a cat"
SHORT, LONG = "a photo of a cat", " ".join(["a photo of a cat"] * 20)  # 5 and 100 tokens
TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def tiny_encoder(rng, hidden_act, extra_resblocks=0):
    """(CLIPTextModel, its weights in OpenCLIP layout for numpy); `extra_resblocks` are in the numpy weights only,
    as SD2's checkpoint holds one resblock more than the converted encoder."""
    sd = random_openclip_state_dict(rng, TINY["vocab_size"], TINY["hidden_size"],
                                    TINY["num_hidden_layers"] + extra_resblocks, TINY["intermediate_size"], 8)
    kept = {k: v for k, v in sd.items() if k not in ("text_projection", "logit_scale")
            and not any(k.startswith(f"transformer.resblocks.{TINY['num_hidden_layers'] + i}.")
                        for i in range(extra_resblocks))}
    te = CLIPTextModel(**TINY, hidden_act=hidden_act)
    hf_sd = convert_sdxl_text_encoder_2_checkpoint(kept)[0]
    assert {n for n, _ in te.parameters_and_names()} == set(hf_sd)
    for name, p in te.parameters_and_names():
        p.set_data(ms.Tensor(hf_sd[name]))
    return te, sd


def numpy_windows(sd, ids, hidden_act, layer_from_end):
    """Per-window conditioning (B*n, 77, C): the layer `layer_from_end` from the end through ln_final."""
    states, _ = openclip_text_forward(sd, ids.reshape(-1, 77), TINY["num_attention_heads"], hidden_act)
    return layer_norm(states[-layer_from_end], sd["ln_final.weight"], sd["ln_final.bias"])


def glue(windows, batch_size):
    """(B*n, 77, C) -> (B, n*75+2, C), written out position by position: BOS, 75 inner tokens per window, last."""
    w = windows.reshape(batch_size, -1, 77, windows.shape[-1])
    n = w.shape[1]
    positions = [(0, 0)] + [(i, j) for i in range(n) for j in range(1, 76)] + [(n - 1, 76)]
    return np.stack([w[:, i, j] for i, j in positions], axis=1)


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    te1, sd1 = tiny_encoder(rng, "quick_gelu")
    te2, sd2 = tiny_encoder(rng, "gelu", extra_resblocks=1)
    return dict(te1=te1, sd1=sd1, te2=te2, sd2=sd2)


@pytest.fixture(scope="module")
def sd1_ids_150():
    return SdTokenizeStrategy(False, 150).tokenize([LONG, SHORT])


def test_pad_ids_differ_between_sd1_and_sd2(tmp_path):
    sd1 = SdTokenizeStrategy(False)
    sd2 = SdTokenizeStrategy(True, tokenizer_cache_dir=str(tmp_path))
    head = [BOS] + CAT_PHOTO + [EOS]
    assert sd1.tokenize(SHORT).tolist() == [head + [EOS] * 70]  # CLIP-L pads with the end token
    assert sd2.tokenize(SHORT).tolist() == [head + [0] * 70]  # OpenCLIP-H pads with 0 ("!")
    batch = sd2.tokenize([SHORT, "cat"])
    assert batch.dtype == np.int32 and batch.shape == (2, 1, 77) and batch[1, 0, :4].tolist() == [BOS, CAT, EOS, 0]
    # upstream's cache folder name, holding the pad token
    with open(tmp_path / "stabilityai_stable-diffusion-2" / "special_tokens_map.json") as f:
        assert json.load(f)["pad_token"] == "!"
    assert SdTokenizeStrategy(True, tokenizer_cache_dir=str(tmp_path)).tokenize(SHORT).tolist() == [head + [0] * 70]

    # a window holding no text: SD1 all end tokens; SD2 BOS EOS then pads
    assert SdTokenizeStrategy(False, 150).tokenize(SHORT)[1].tolist() == [BOS] + [EOS] * 76
    assert SdTokenizeStrategy(True, 150).tokenize(SHORT)[1].tolist() == [BOS, EOS] + [0] * 75
    with pytest.raises(ValueError, match="max_token_length must be None, 75, 150 or 225, got 100"):
        SdTokenizeStrategy(True, 100)


def test_sd1_last_layer_through_final_layer_norm(models):
    ids = SdTokenizeStrategy(False).tokenize([SHORT, LONG])
    got = encode_tokens_sd(models["te1"], ms.Tensor(ids)).asnumpy()
    expected = numpy_windows(models["sd1"], ids, "quick_gelu", 1)
    assert got.shape == (2, 77, TINY["hidden_size"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    half = encode_tokens_sd(models["te1"], ms.Tensor(ids), dtype=ms.float16)
    assert half.dtype == ms.float16
    np.testing.assert_allclose(half.asnumpy().astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_sd1_clip_skip_2_with_150_tokens(models, sd1_ids_150):
    ids = sd1_ids_150
    assert ids.shape == (2, 2, 77)
    got = encode_tokens_sd(models["te1"], ms.Tensor(ids), clip_skip=2).asnumpy()
    expected = glue(numpy_windows(models["sd1"], ids, "quick_gelu", 2), 2)
    assert got.shape == (2, 152, TINY["hidden_size"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the penultimate layer, not the last
    last = encode_tokens_sd(models["te1"], ms.Tensor(ids)).asnumpy()
    assert np.abs(last - got).max() > 0.1
    np.testing.assert_allclose(last, glue(numpy_windows(models["sd1"], ids, "quick_gelu", 1), 2), rtol=1e-4, atol=1e-4)


def test_sd2_225_tokens_with_an_empty_window(models):
    ids = SdTokenizeStrategy(True, 225).tokenize([LONG])
    assert ids[0, 1].tolist() == [BOS] + (CAT_PHOTO * 5)[:25] + [EOS] + [0] * 50
    assert ids[0, 2].tolist() == [BOS, EOS] + [0] * 75  # the empty third window

    got = encode_tokens_sd(models["te2"], ms.Tensor(ids)).asnumpy()
    # SD2's "last layer" is the OpenCLIP checkpoint's penultimate (its last resblock is dropped on conversion)
    windows = numpy_windows(models["sd2"], ids, "gelu", 2)
    assert got.shape == (1, 227, TINY["hidden_size"])
    np.testing.assert_allclose(got, glue(windows, 1), rtol=1e-4, atol=1e-4)
    # upstream's empty-window fix-up never runs: the third window's first inner position keeps its end-token state
    # rather than taking the following pad's
    np.testing.assert_allclose(got[0, 151], windows[2, 1], rtol=1e-4, atol=1e-4)
    assert np.abs(windows[2, 1] - windows[2, 2]).max() > 0.1


def test_graph_mode_matches_pynative(models, sd1_ids_150):
    cell = SdTextEncoder(models["te1"], clip_skip=2)
    inputs = [ms.Tensor(sd1_ids_150), ms.Tensor(SdTokenizeStrategy(False).tokenize([SHORT, LONG]))]
    eager = [cell(x).asnumpy() for x in inputs]
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = [cell(x).asnumpy() for x in inputs]  # two shapes: two compiles
    finally:
        ms.set_context(mode=previous_mode)
    assert [g.shape for g in graph] == [(2, 152, 32), (2, 77, 32)]
    for g, e in zip(graph, eager):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_skip", [0, 4, 2.0])
def test_clip_skip_must_name_a_layer(models, clip_skip):
    with pytest.raises(ValueError, match=rf"--clip_skip must be between 1 and 3 .*got {clip_skip!r}"):
        SdTextEncoder(models["te1"], clip_skip=clip_skip)
