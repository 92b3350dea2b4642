import filecmp
import json
import os

import numpy as np
import pytest

from library import sdxl_tokenize
from library.sdxl_tokenize import SdxlTokenizeStrategy

BOS, EOS = 49406, 49407
A, PHOTO, OF, CAT = 320, 1125, 539, 2368  # "a", "photo", "of", "cat", checked against the BPE below
WORDS = {"a": A, "photo": PHOTO, "of": OF, "cat": CAT}


def prompt(n_tokens):
    """A prompt of n one-token words cycling a/photo/of/cat, and its plain token ids (no BOS/EOS)."""
    words = [list(WORDS)[i % 4] for i in range(n_tokens)]
    return " ".join(words), [WORDS[w] for w in words]


@pytest.fixture(scope="module")
def tok150():
    return SdxlTokenizeStrategy(150)


def test_vocab_is_clips_bpe():
    tok_dir = sdxl_tokenize.BUNDLED_TOKENIZER_DIR
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().split("\n")[1:]
    id_to_token = {i: t for t, i in vocab.items()}
    assert len(vocab) == 49408 and id_to_token[BOS] == "<|startoftext|>" and id_to_token[EOS] == "<|endoftext|>"
    # ids 0..255 are the byte characters starting at "!", 256..511 the same with </w>, then one per merge
    assert id_to_token[0] == "!" and id_to_token[A] == "a</w>" and A == 256 + ord("a") - ord("!")
    for token_id, pair in ((PHOTO, "pho to</w>"), (OF, "o f</w>"), (CAT, "c at</w>")):
        assert merges[token_id - 512] == pair
        assert id_to_token[token_id] == pair.replace(" ", "")
    assert os.path.exists(os.path.join(tok_dir, "LICENSE"))


def test_bundled_files_match_the_generator(tmp_path):
    bpe = os.path.join(os.path.dirname(sdxl_tokenize.BUNDLED_TOKENIZER_DIR), "..", "..", "shared", "data",
                       "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(bpe):
        pytest.skip("the CLIP BPE source file (../shared) is not available")
    from tools.make_tokenizer_files import write_tokenizer_files

    write_tokenizer_files(bpe, str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, sdxl_tokenize.BUNDLED_TOKENIZER_DIR, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_simple_prompt_and_padding():
    tok = SdxlTokenizeStrategy()
    ids1, ids2 = tok.tokenize("a photo of a cat")
    assert ids1.dtype == np.int32 and ids1.shape == (1, 77) and ids2.shape == (1, 77)
    head = [BOS, A, PHOTO, OF, A, CAT, EOS]
    assert ids1[0].tolist() == head + [EOS] * 70  # CLIP-L pads with the end token
    assert ids2[0].tolist() == head + [0] * 70  # bigG pads with 0, as open_clip
    assert tok.tokenizer1.pad_token_id == EOS and tok.tokenizer2.pad_token_id == 0

    batch1, batch2 = tok.tokenize(["a photo of a cat", "cat"])
    assert batch1.shape == (2, 1, 77) and batch2.shape == (2, 1, 77)
    assert batch2[1, 0, :4].tolist() == [BOS, CAT, EOS, 0]


def test_default_length_truncates_to_75_tokens():
    text, t = prompt(90)
    ids1, ids2 = SdxlTokenizeStrategy().tokenize(text)
    assert ids1[0].tolist() == [BOS] + t[:75] + [EOS]
    assert ids2[0].tolist() == [BOS] + t[:75] + [EOS]


def test_150_tokens_text_spanning_both_windows(tok150):
    text, t = prompt(100)
    ids1, ids2 = tok150.tokenize(text)
    assert ids1.shape == (2, 77)
    assert ids1[0].tolist() == [BOS] + t[:75] + [EOS]
    assert ids1[1].tolist() == [BOS] + t[75:100] + [EOS] * 51
    # TE2: the first window was cut inside the text, so its last id (a pad) becomes EOS
    assert ids2[0].tolist() == [BOS] + t[:75] + [EOS]
    assert ids2[1].tolist() == [BOS] + t[75:100] + [EOS] + [0] * 50


def test_150_tokens_short_text_leaves_an_empty_window(tok150):
    text, t = prompt(5)
    ids1, ids2 = tok150.tokenize(text)
    assert ids1.tolist() == [[BOS] + t + [EOS] * 71, [BOS] + [EOS] * 76]
    # TE2: the empty second window reads BOS EOS PAD..., not BOS PAD...
    assert ids2.tolist() == [[BOS] + t + [EOS] + [0] * 70, [BOS, EOS] + [0] * 75]


def test_150_tokens_exactly_one_full_window(tok150):
    text, t = prompt(75)
    ids1, ids2 = tok150.tokenize(text)
    assert ids1.tolist() == [[BOS] + t + [EOS], [BOS] + [EOS] * 76]
    assert ids2.tolist() == [[BOS] + t + [EOS], [BOS, EOS] + [0] * 75]


def test_150_tokens_overlong_text_is_truncated(tok150):
    text, t = prompt(200)
    ids1, ids2 = tok150.tokenize(text)
    expected = [[BOS] + t[:75] + [EOS], [BOS] + t[75:150] + [EOS]]
    assert ids1.tolist() == expected and ids2.tolist() == expected


def test_225_tokens_gives_three_windows():
    text, t = prompt(160)
    ids1, ids2 = SdxlTokenizeStrategy(225).tokenize(text)
    assert ids1.shape == (3, 77) and ids2.shape == (3, 77)
    assert ids1[2].tolist() == [BOS] + t[150:160] + [EOS] * 66
    assert ids2[2].tolist() == [BOS] + t[150:160] + [EOS] + [0] * 65
    assert ids2[1].tolist() == [BOS] + t[75:150] + [EOS]


@pytest.mark.parametrize("bad", [0, 77, 100, 300, "150"])
def test_invalid_max_token_length(bad):
    with pytest.raises(ValueError, match="max_token_length must be None, 75, 150 or 225"):
        SdxlTokenizeStrategy(bad)


def test_tokenizer_cache_dir_saves_then_loads(tmp_path, monkeypatch):
    text, _ = prompt(100)
    first = SdxlTokenizeStrategy(150, tokenizer_cache_dir=str(tmp_path))
    folder1 = tmp_path / "openai_clip-vit-large-patch14"
    folder2 = tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert (folder1 / "vocab.json").exists() and (folder2 / "merges.txt").exists()
    with open(folder2 / "special_tokens_map.json") as f:
        assert json.load(f)["pad_token"] == "!"

    # with the bundled files gone, the strategy must come up from the cache alone, unchanged
    monkeypatch.setattr(sdxl_tokenize, "BUNDLED_TOKENIZER_DIR", str(tmp_path / "missing"))
    second = SdxlTokenizeStrategy(150, tokenizer_cache_dir=str(tmp_path))
    for a, b in zip(first.tokenize(text), second.tokenize(text)):
        np.testing.assert_array_equal(a, b)
    assert second.tokenizer2.pad_token_id == 0
    with pytest.raises(OSError):
        SdxlTokenizeStrategy(150)  # no cache: needs the (now missing) bundled files
