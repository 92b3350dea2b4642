import random
from types import SimpleNamespace

import pytest

from library.captions import caption_for_cached_text_encoder, count_tags, process_caption, read_caption_file

from tests.dataset_helpers import write_text


def settings(**overrides):
    values = dict(
        caption_prefix=None,
        caption_suffix=None,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        enable_wildcard=False,
        shuffle_caption=False,
        caption_separator=",",
        keep_tokens=0,
        keep_tokens_separator="",
        token_warmup_min=1,
        token_warmup_step=0,
        caption_tag_dropout_rate=0.0,
        secondary_separator=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_without_randomising_options_the_caption_is_untouched():
    assert process_caption(settings(), "a,b ,  c", random.Random(0)) == "a,b ,  c"
    assert process_caption(settings(), "first line\nsecond", random.Random(0)) == "first line"


def test_prefix_and_suffix_are_joined_with_a_space():
    s = settings(caption_prefix="masterpiece,", caption_suffix=", from side")
    assert process_caption(s, "1girl", random.Random(0)) == "masterpiece, 1girl , from side"


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shuffle_keeps_the_first_keep_tokens(seed):
    s = settings(shuffle_caption=True, keep_tokens=2)
    flex = ["c", "d", "e", "f"]
    random.Random(seed).shuffle(flex)  # the one random draw the pipeline makes
    assert process_caption(s, "a, b,c ,d, e,f", random.Random(seed)) == ", ".join(["a", "b"] + flex)


def test_keep_tokens_separator_fixes_head_and_tail():
    s = settings(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
    caption = "1girl, hatsune miku ||| stage, microphone, smile ||| best quality, rating: general"
    for seed in range(5):
        out = process_caption(s, caption, random.Random(seed))
        tags = out.split(", ")
        assert tags[:2] == ["1girl", "hatsune miku"]
        assert tags[-2:] == ["best quality", "rating: general"]
        assert sorted(tags[2:-2]) == ["microphone", "smile", "stage"]
    # dropping every flexible tag leaves exactly the fixed parts
    s = settings(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||")
    assert process_caption(s, caption, random.Random(0)) == "1girl, hatsune miku, best quality, rating: general"


def test_secondary_separator_groups_tags_through_shuffle():
    s = settings(secondary_separator=";;;")
    assert process_caption(s, "a, sky;;;cloud;;;day, b", random.Random(0)) == "a, sky,cloud,day, b"
    s = settings(secondary_separator=";;;", shuffle_caption=True)
    for seed in range(5):
        tags = process_caption(s, "a, sky;;;cloud, b", random.Random(seed)).split(", ")
        assert sorted(tags) == ["a", "b", "sky,cloud"]


def test_caption_dropout_rate_and_every_n_epochs():
    assert process_caption(settings(caption_dropout_rate=1.0), "a, b", random.Random(0)) == ""
    for seed in range(10):
        dropped = random.Random(seed).random() < 0.5
        out = process_caption(settings(caption_dropout_rate=0.5), "a, b", random.Random(seed))
        assert out == ("" if dropped else "a, b")
    s = settings(caption_dropout_every_n_epochs=2)
    assert [process_caption(s, "a", random.Random(0), current_epoch=e) for e in (1, 2, 3, 4)] == ["a", "", "a", ""]


def test_tag_dropout_drops_only_flexible_tags():
    s = settings(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption(s, "sks, red, blue", random.Random(0)) == "sks"
    s = settings(caption_tag_dropout_rate=0.5)
    rng = random.Random(3)
    expected = [t for t in ["a", "b", "c", "d"] if rng.random() >= 0.5]
    assert process_caption(s, "a,b,c,d", random.Random(3)) == ", ".join(expected)


def test_wildcards_lines_and_escapes():
    s = settings(enable_wildcard=True)
    choice = random.Random(1).choice(["simple", "white"])
    assert process_caption(s, "1girl, {simple|white} background", random.Random(1)) == f"1girl, {choice} background"
    assert process_caption(s, "1girl, {{retro style}}", random.Random(0)) == "1girl, {retro style}"
    line = random.Random(5).choice(["first", "second", "third"])
    assert process_caption(s, "first\nsecond\nthird", random.Random(5)) == line


def test_token_warmup_limits_flexible_tags():
    # 10 warmup steps, 5 flexible tags, min 1: at step 5 -> floor(5 * (5 - 1) / 10) + 1 = 3 tags
    s = settings(token_warmup_step=10, keep_tokens=1)
    assert process_caption(s, "k, a, b, c, d, e", random.Random(0), current_step=5) == "k, a, b, c"
    assert process_caption(s, "k, a, b, c, d, e", random.Random(0), current_step=10) == "k, a, b, c, d, e"
    # below 1 the warmup is a fraction of max_train_steps: 0.5 * 20 = 10 steps, same as above
    s = settings(token_warmup_step=0.5, keep_tokens=1)
    assert process_caption(s, "k, a, b, c, d, e", random.Random(0), current_step=5, max_train_steps=20) == "k, a, b, c"


def test_cached_text_encoder_caption_applies_only_deterministic_steps():
    s = settings(caption_prefix="pre", caption_suffix="post", secondary_separator=";")
    assert caption_for_cached_text_encoder(s, "a;b") == "pre a,b post"


def test_read_caption_file(tmp_path):
    image = str(tmp_path / "img.png")
    assert read_caption_file(image, ".txt", False) is None
    write_text(tmp_path / "img.txt", "first, line\n\nsecond line\n")
    assert read_caption_file(image, ".txt", False) == "first, line"
    assert read_caption_file(image, ".txt", True) == "first, line\nsecond line"
    # a face-crop name falls back to the caption of the stem without _cx_cy_w_h
    write_text(tmp_path / "face.txt", "face caption")
    assert read_caption_file(str(tmp_path / "face_10_20_30_40.png"), ".txt", False) == "face caption"
    write_text(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="caption file is empty: .*empty.txt"):
        read_caption_file(str(tmp_path / "empty.png"), ".txt", False)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8: .*latin.txt"):
        read_caption_file(str(tmp_path / "latin.png"), ".txt", False)


def test_count_tags_lowercases_and_strips():
    assert count_tags(["A, b", "a,  , c"]) == {"a": 2, "b": 1, "c": 1}
