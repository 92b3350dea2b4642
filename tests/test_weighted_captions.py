"""--weighted_captions: the (word:1.2) parser, the per-token weights, the weighted encoding (against numpy and
upstream's formula) and the refused combination."""

import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import sdxl_train_network
from clip_numpy import openclip_text_forward, random_openclip_state_dict
from library import train_util
from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.openclip_conversion import convert_sdxl_text_encoder_2_checkpoint
from library.prompt_weights import parse_prompt_attention
from library.sdxl_tokenize import SdxlTokenizeStrategy

BOS, EOS = 49406, 49407
A, PHOTO, OF, CAT = 320, 1125, 539, 2368  # "a", "photo", "of", "cat" (see test_tokenize.py)
UP, DOWN = 1.1, 1 / 1.1


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", UP)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),
    # upstream's docstring example, its printed values (the first "(" is never closed)
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
    ("[a [b]]", [("a ", DOWN), ("b", DOWN * DOWN)]),
    ("(red:1.5) [cat:2]", [("red", 1.5), (" ", 1.0), ("cat:2", DOWN)]),  # weights only close round brackets
    ("x) y] z:1.2)", [("x) y] z:1.2)", 1.0)]),  # unmatched closers are text
    (r"a \\ b\c", [("a \\ bc", 1.0)]),  # escaped backslash kept, a lone one dropped
    ("(w:-0.5) (v:+2)", [("w", -0.5), (" ", 1.0), ("v", 2.0)]),
    ("(w:1.2.3)", [("w:1.2.3)", UP)]),  # upstream crashes on float("1.2.3"); here it is text
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-15)


@pytest.fixture(scope="module")
def tokenizers():
    return {n: SdxlTokenizeStrategy(n) for n in (None, 150)}


def test_token_weights_one_window(tokenizers):
    (ids1, ids2), (w1, w2) = tokenizers[None].tokenize_with_weights("a (photo:1.5) of [cat]")
    assert ids1.shape == w1.shape == ids2.shape == w2.shape == (1, 77)
    assert ids1.dtype == np.int32 and w1.dtype == np.float32
    assert list(ids1[0, :7]) == [BOS, A, PHOTO, OF, CAT, EOS, EOS]
    assert list(ids2[0, :7]) == [BOS, A, PHOTO, OF, CAT, EOS, 0]
    expected = np.ones(77, np.float32)
    expected[2], expected[4] = 1.5, DOWN
    np.testing.assert_array_equal(w1[0], expected)
    np.testing.assert_array_equal(w2[0], expected)


def test_unweighted_caption_tokenizes_as_without_the_flag(tokenizers):
    caption = " ".join(["a photo of a cat,"] * 40)  # 240 tokens: truncated to 150
    for tok in tokenizers.values():
        (ids1, ids2), (w1, w2) = tok.tokenize_with_weights([caption, "a cat"])
        plain1, plain2 = tok.tokenize([caption, "a cat"])
        np.testing.assert_array_equal(ids1, plain1)
        np.testing.assert_array_equal(ids2, plain2)
        assert (w1 == 1).all() and (w2 == 1).all()


def test_token_weights_are_split_into_windows_like_the_ids(tokenizers):
    # 74 plain tokens, then "(cat:2) (cat:2) ..." crossing into the second window
    caption = " ".join(["a"] * 74) + " " + " ".join(["(cat:2)"] * 10)
    (ids1, ids2), (w1, w2) = tokenizers[150].tokenize_with_weights(caption)
    assert ids1.shape == w1.shape == (2, 77)
    assert ids1[0, 74] == A and ids1[0, 75] == CAT and ids1[1, 1] == ids1[1, 9] == CAT and ids1[1, 10] == EOS
    expected = np.ones((2, 77), np.float32)
    expected[0, 75] = 2.0
    expected[1, 1:10] = 2.0
    for w in (w1, w2):
        np.testing.assert_array_equal(w, expected)
    assert ids2[0, 76] == EOS  # TE2's first window, cut inside the text, still ends with EOS


# ---- the weighted encoding, in graph mode, against numpy


class WeightedTextCond(nn.Cell):
    """The train step's text conditioning call, with the weights as inputs."""

    def __init__(self, te1, te2):
        super().__init__()
        self.te1, self.te2 = te1, te2

    def construct(self, *text_fields):
        return sdxl_train_network.sdxl_get_text_cond(self.te1, self.te2, *text_fields)


@pytest.fixture(scope="module")
def encoders():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_sdxl.json")) as f:
        cfg = json.load(f)
    c1, c2 = cfg["text_encoder_1"], cfg["text_encoder_2"]
    rng = np.random.default_rng(3)
    sd1 = random_openclip_state_dict(rng, c1["vocab_size"], c1["hidden_size"], c1["num_hidden_layers"],
                                     c1["intermediate_size"], 8)
    del sd1["text_projection"], sd1["logit_scale"]
    sd2 = random_openclip_state_dict(rng, c2["vocab_size"], c2["hidden_size"], c2["num_hidden_layers"],
                                     c2["intermediate_size"], c2["projection_dim"])
    te1, te2 = CLIPTextModel(**c1), CLIPTextModelWithProjection(**c2)
    for cell, sd in ((te1, sd1), (te2, sd2)):
        for name, value in convert_sdxl_text_encoder_2_checkpoint(sd)[0].items():
            dict(cell.parameters_and_names())[name].set_data(ms.Tensor(value))
    return dict(te1=te1, te2=te2, sd1=sd1, sd2=sd2, heads1=c1["num_attention_heads"],
                heads2=c2["num_attention_heads"])


def numpy_weighted_conds(encoders, ids1, ids2, w1, w2):
    """Upstream's encode_tokens_with_weights in numpy: each window's penultimate hidden states, glued (BOS of window
    0, positions 1..75 of each window, last position), then positions i*75+1..i*75+75 times window i's inner
    weights (one window: all 77 times its weights); pool2 from the unweighted last layer."""
    batch, n, _ = ids1.shape
    states1, _ = openclip_text_forward(encoders["sd1"], ids1.reshape(batch * n, 77), encoders["heads1"], "quick_gelu")
    states2, final2 = openclip_text_forward(encoders["sd2"], ids2.reshape(batch * n, 77), encoders["heads2"], "gelu")
    hidden = []
    for states, w in ((states1[-2], w1), (states2[-2], w2)):
        h = states.reshape(batch, n * 77, -1)
        if n == 1:
            hidden.append(h * w[:, 0, :, None])
            continue
        windows = [h[:, i * 77 + 1 : (i + 1) * 77 - 1] for i in range(n)]
        h = np.concatenate([h[:, :1], *windows, h[:, -1:]], axis=1)
        for i in range(n):
            h[:, i * 75 + 1 : i * 75 + 76] *= w[:, i, 1:-1, None]
        hidden.append(h)
    first2 = ids2.reshape(batch * n, 77)
    eos = np.argmax(first2 == EOS, axis=1)
    pooled = final2[np.arange(batch * n), eos] @ encoders["sd2"]["text_projection"]
    return hidden[0], hidden[1], pooled.reshape(batch, n, -1)[:, 0]


@pytest.mark.parametrize("max_token_length, mode", [(None, ms.PYNATIVE_MODE), (150, ms.GRAPH_MODE)])
def test_weighted_encoding_matches_upstreams_formula(encoders, tokenizers, max_token_length, mode):
    captions = ["a (photo:1.5) of [[a cat]]", " ".join(["a photo of a (red:0.5) cat"] * 14)]  # 7 and 98 tokens
    (ids1, ids2), (w1, w2) = tokenizers[max_token_length].tokenize_with_weights(captions)
    assert (w1 != 1).any(axis=(1, 2)).all()
    expected = numpy_weighted_conds(encoders, ids1, ids2, w1, w2)
    cell = WeightedTextCond(encoders["te1"], encoders["te2"])
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        weighted = [o.asnumpy() for o in cell(*(ms.Tensor(a) for a in (ids1, ids2, w1, w2)))]
    finally:
        ms.set_context(mode=previous_mode)
    unweighted = [o.asnumpy() for o in sdxl_train_network.sdxl_get_text_cond(
        encoders["te1"], encoders["te2"], ms.Tensor(ids1), ms.Tensor(ids2))]
    for got, want in zip(weighted, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the weights change the hidden states, not pool2 (no rescaling to the original mean either)
    assert np.abs(weighted[0] - unweighted[0]).max() > 1e-2 and np.abs(weighted[1] - unweighted[1]).max() > 1e-2
    np.testing.assert_array_equal(weighted[2], unweighted[2])


# ---- the flag


def test_weighted_captions_with_cached_text_encoder_outputs_is_refused():
    parser = sdxl_train_network.setup_parser()
    for cache_flag in ("--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk"):
        args = parser.parse_args(["--weighted_captions", cache_flag])
        with pytest.raises(ValueError, match="^--weighted_captions cannot be used with --cache_text_encoder_outputs: "):
            train_util.check_unsupported_flags(args)
    train_util.check_unsupported_flags(parser.parse_args(["--weighted_captions"]))  # alone: accepted
