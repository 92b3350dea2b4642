import json
from collections import Counter

import cv2
import numpy as np
import pytest

from library.dataset_metadata import dataset_metadata
from library.datasets import batch_fields, debug_dataset
from library.image_loading import BadImageError, load_image

from tests.dataset_helpers import FakeTokenizeStrategy, build_group, write_image, write_text


def all_batches(group, epoch=1):
    group.set_current_epoch(epoch)
    return [group.get_batch(i) for i in range(len(group))]


@pytest.fixture
def reg_tree(tmp_path):
    """2 + 1 training images (repeats 5 and 2 -> 12 with repeats) and 5 regularisation images."""
    train_a, train_b, reg = tmp_path / "5_sks", tmp_path / "2_other", tmp_path / "1_dog"
    for k in range(2):
        write_image(str(train_a / f"a{k}.png"), 16, 16, seed=k)
        write_text(train_a / f"a{k}.txt", "sks, red")
    write_image(str(train_b / "b0.jpg"), 16, 16, seed=5)
    for k in range(5):
        write_image(str(reg / f"r{k}.png"), 16, 16, seed=10 + k)
    toml_text = f"""
[general]
resolution = 16
caption_extension = ".txt"
[[datasets]]
batch_size = 4
  [[datasets.subsets]]
  image_dir = "{train_a}"
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = "{train_b}"
  num_repeats = 2
  class_tokens = "other thing"
  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  class_tokens = "dog"
"""
    return tmp_path, toml_text


def test_reg_balancing_counts_and_loss_weights(reg_tree):
    tmp_path, toml_text = reg_tree
    group = build_group(toml_text, tmp_path, ["--prior_loss_weight", "0.5"])
    assert (group.num_train_images, group.num_reg_images) == (12, 5)
    # Upstream's loop: pass 1 registers the 5 reg images (5), pass 2 adds a repeat to each (10),
    # pass 3 to r0 and r1 (12 = number of training images) and stops.
    (dataset,) = group.datasets
    repeats = {info.image_key.rsplit("/", 1)[1]: info.num_repeats for info in dataset.image_data.values() if info.is_reg}
    assert repeats == {"r0.png": 3, "r1.png": 3, "r2.png": 2, "r3.png": 2, "r4.png": 2}

    seen = Counter()
    weights = {}
    for arrays, details in all_batches(group):
        fields = dict(zip(group.batch_fields, arrays))
        for key, weight in zip(details["image_key"], fields["loss_weights"]):
            seen[key.rsplit("/", 1)[1]] += 1
            weights[key.rsplit("/", 1)[1]] = float(weight)
    assert seen == Counter({"a0.png": 5, "a1.png": 5, "b0.jpg": 2, "r0.png": 3, "r1.png": 3, "r2.png": 2, "r3.png": 2, "r4.png": 2})
    assert {k: w for k, w in weights.items() if k.startswith("r")} == dict.fromkeys(["r0.png", "r1.png", "r2.png", "r3.png", "r4.png"], 0.5)
    assert {k: w for k, w in weights.items() if not k.startswith("r")} == {"a0.png": 1.0, "a1.png": 1.0, "b0.jpg": 1.0}
    assert len(group) == 6  # 24 samples in one bucket, batch size 4


def test_more_reg_images_than_training_images_are_left_out(tmp_path):
    write_image(str(tmp_path / "t" / "t.png"), 16, 16)
    for k in range(3):
        write_image(str(tmp_path / "r" / f"r{k}.png"), 16, 16)
    group = build_group(
        f'[general]\nresolution = 16\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path / "t"}"\n  num_repeats = 2\n'
        f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "r"}"\n  is_reg = true\n',
        tmp_path,
    )
    (dataset,) = group.datasets
    assert sorted(k.rsplit("/", 1)[1] for k in dataset.image_data) == ["r0.png", "r1.png", "t.png"]


def test_captions_from_files_with_class_token_fallback_and_tokens(reg_tree):
    tmp_path, toml_text = reg_tree
    tokenizer = FakeTokenizeStrategy()
    group = build_group(toml_text, tmp_path, tokenize_strategy=tokenizer)
    expected = {"a0.png": "sks, red", "a1.png": "sks, red", "b0.jpg": "other thing", "r0.png": "dog"}
    for arrays, details in all_batches(group):
        ids1, ids2 = arrays[1], arrays[2]
        assert ids1.dtype == np.int32 and ids1.shape == (len(details["caption"]), 1, 77)
        for k, (key, caption) in enumerate(zip(details["image_key"], details["caption"])):
            name = key.rsplit("/", 1)[1]
            if name in expected:
                assert caption == expected[name]
            assert tokenizer.decode(ids1[k]) == caption
            assert np.array_equal(ids2[k], ids1[k] + 1)


def test_batch_layout_dtypes_and_one_bucket_per_batch(tmp_path):
    for k in range(3):
        write_image(str(tmp_path / "img" / f"wide{k}.png"), 96, 64, seed=k)
        write_image(str(tmp_path / "img" / f"tall{k}.png"), 64, 96, seed=10 + k)
    toml_text = f"""
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'img'}"
  num_repeats = 2
"""
    group = build_group(toml_text, tmp_path)
    assert group.batch_fields == batch_fields(False, False) == (
        "images", "input_ids1", "input_ids2", "loss_weights", "original_sizes_hw", "crop_top_lefts", "target_sizes_hw",
    )
    # Buckets for area 64^2, sides 32..128, step 32: (32,96) (32,128) (64,64) (96,32) (128,32).
    # 96x64 (AR 1.5): errors 1.17, 1.25, 0.5, 1.5, 2.5 -> 64x64.
    # 64x96 (AR 0.667): 32x96 (AR 0.333) and 64x64 (AR 1) are both 1/3 away; in floating point
    # 0.667 - 0.333 is the smaller -> 32x96 (W x H), i.e. target (96, 32) as (h, w).
    # 6 samples each with batch size 2: 3 batches per bucket.
    targets = Counter()
    for arrays, details in all_batches(group):
        images, _, _, weights, original, crop, target = arrays
        assert images.dtype == np.float32 and images.shape[1] == 3
        assert -1.0 <= images.min() and images.max() <= 1.0
        assert weights.dtype == np.float32 and original.dtype == crop.dtype == target.dtype == np.int32
        assert original.shape == crop.shape == target.shape == (len(images), 2) == (2, 2)
        assert len(set(map(tuple, target))) == 1  # one bucket per batch
        assert images.shape[2:] == tuple(target[0])
        kind = "wide" if (target[0] == [64, 64]).all() else "tall"
        assert all(kind in key for key in details["image_key"])
        targets[tuple(target[0])] += 1
    assert targets == {(64, 64): 3, (96, 32): 3}


BUCKETS_64x96 = """
[general]
resolution = [64, 96]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 192
bucket_reso_steps = 16
flip_aug = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{}"
  num_repeats = 8
"""
# Buckets for area 64*96 = 6144, sides 32..192, step 16 near these aspect ratios:
# (48,112) AR .429, (64,96) AR .667, (64,80) AR .8, (64,64) AR 1.


def test_size_conditioning_and_pixels(tmp_path):
    # 80x130 (AR .615) -> bucket 64x96 (error .051, next best 64x80 .185). The image is narrower
    # than the bucket: widths match, scale 0.8 -> 64x104, centre crop of 8 rows from row 4.
    # SAI crop: heights match, width 96 * .615 = 59.08, left = (64 - 59.08) // 2 = 2, right 61.08;
    # flipped: left = 64 - 61.08 = 2.92 -> 2.
    path = write_image(str(tmp_path / "img" / "p.png"), 80, 130)
    group = build_group(BUCKETS_64x96.format(tmp_path / "img"), tmp_path)
    batches = all_batches(group)
    flips = [details["flipped"][0] for _, details in batches]
    assert True in flips and False in flips

    expected = cv2.resize(load_image(path), (64, 104), interpolation=cv2.INTER_AREA)[4:100].astype(np.float32) / 127.5 - 1
    for arrays, details in batches:
        images, _, _, _, original, crop, target = arrays
        assert original[0].tolist() == [130, 80] and target[0].tolist() == [96, 64]
        assert crop[0].tolist() == [0, 2]
        pixels = expected[:, ::-1] if details["flipped"][0] else expected
        assert np.allclose(images[0], pixels.transpose(2, 0, 1))


def test_flip_adjusts_crop_left(tmp_path):
    # 57x96 (AR .594) -> bucket 64x96 (error .073, next best 48x112 .165); SAI crop: heights match,
    # width 57, left = (64 - 57) // 2 = 3, right 60; flipped: left = 64 - 60 = 4.
    write_image(str(tmp_path / "img" / "q.png"), 57, 96)
    group = build_group(BUCKETS_64x96.format(tmp_path / "img"), tmp_path)
    crops = {details["flipped"][0]: arrays[5][0].tolist() for arrays, details in all_batches(group)}
    assert crops == {False: [0, 3], True: [0, 4]}


def test_epoch_shuffle_is_a_pure_function_of_seed_epoch_and_index(reg_tree):
    tmp_path, toml_text = reg_tree
    toml_text = toml_text.replace("[general]", "[general]\nshuffle_caption = true\nflip_aug = true")

    def keys(group, epoch, order):
        group.set_current_epoch(epoch)
        return {i: (group.get_batch(i)[1]["image_key"], group.get_batch(i)[1]["caption"]) for i in order}

    a = build_group(toml_text, tmp_path, seed=7)
    b = build_group(toml_text, tmp_path, seed=7)
    forward = keys(a, 1, range(len(a)))
    backward = keys(b, 1, reversed(range(len(b))))
    assert forward == backward
    epoch2 = keys(a, 2, range(len(a)))
    assert forward != epoch2
    assert keys(a, 1, range(len(a))) == forward  # going back to epoch 1 gives epoch 1 again
    flat = lambda d: sorted(k for keys_, _ in d.values() for k in keys_)  # noqa: E731
    assert flat(forward) == flat(epoch2)  # same samples, another order
    assert keys(build_group(toml_text, tmp_path, seed=8), 1, range(len(a))) != forward


def test_without_bucketing_large_needs_random_crop_and_small_is_an_error(tmp_path):
    write_image(str(tmp_path / "big" / "big.png"), 80, 64)
    write_image(str(tmp_path / "small" / "small.png"), 32, 32)
    base = '[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{}"\n'
    group = build_group(base.format(tmp_path / "big"), tmp_path)
    with pytest.raises(BadImageError, match="larger than the resolution 64x64 and neither bucketing nor random_crop.*big.png"):
        group[0]
    group = build_group(base.format(tmp_path / "big") + "  random_crop = true\n", tmp_path)
    images, *_, original, crop, target = group[0]
    assert images.shape == (1, 3, 64, 64) and original[0].tolist() == [64, 64] and crop[0].tolist() == [0, 0]
    group = build_group(base.format(tmp_path / "small"), tmp_path)
    with pytest.raises(BadImageError, match="smaller than the resolution 64x64.*small.png"):
        group[0]


def test_bad_images_are_reported_by_path(tmp_path):
    (tmp_path / "img").mkdir()
    write_text(tmp_path / "img" / "not_an_image.png", "hello")
    base = f'[general]\nresolution = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path / "img"}"\n'
    with pytest.raises(BadImageError, match="cannot read image .*not_an_image.png"):
        build_group(base, tmp_path)
    (tmp_path / "img" / "not_an_image.png").unlink()
    good = write_image(str(tmp_path / "img" / "truncated.png"), 64, 64)
    data = open(good, "rb").read()
    open(good, "wb").write(data[: len(data) // 2])
    group = build_group(base, tmp_path)
    with pytest.raises(BadImageError, match="cannot load image .*truncated.png"):
        group[0]


def test_fine_tuning_json_and_jsonl(tmp_path):
    write_image(str(tmp_path / "img" / "x.png"), 64, 64)
    write_image(str(tmp_path / "img" / "y.png"), 64, 64)
    (tmp_path / "md.json").write_text(json.dumps({"x.png": {"caption": "a cat", "tags": "cute, small"}, "y.png": {"tags": "dog"}}))
    (tmp_path / "md.jsonl").write_text(
        json.dumps({"image_path": str(tmp_path / "img" / "x.png"), "caption": "photo", "image_size": [64, 64]}) + "\n"
    )
    toml_text = f"""
[general]
resolution = 64
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'img'}"
  metadata_file = "{tmp_path / 'md.json'}"
  num_repeats = 3
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "{tmp_path / 'md.jsonl'}"
"""
    group = build_group(toml_text, tmp_path)
    ft_json, ft_jsonl = group.datasets
    assert {k: i.caption for k, i in ft_json.image_data.items()} == {"x.png": "a cat,cute, small", "y.png": "dog"}
    assert ft_json.tag_frequency == {"md.json": {"cute": 1, "small": 1, "dog": 1}}
    assert group.num_train_images == 2 * 3 + 1
    assert [i.caption for i in ft_jsonl.image_data.values()] == ["photo"]
    captions = sorted(c for _, d in all_batches(group) for c in d["caption"])
    assert captions == sorted(["a cat,cute, small"] * 3 + ["dog"] * 3 + ["photo"])


def test_metadata_for_lora_files(reg_tree):
    tmp_path, toml_text = reg_tree
    group = build_group(toml_text, tmp_path)
    meta = dataset_metadata(group, from_dataset_config=True)
    (info,) = json.loads(meta["ss_datasets"])
    assert (info["num_train_images"], info["num_reg_images"], info["batch_size_per_device"]) == (12, 5, 4)
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"]) for s in info["subsets"]] == [
        ("5_sks", 2, 5, False), ("2_other", 1, 2, False), ("1_dog", 5, 1, True),
    ]
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks": {"n_repeats": 5, "img_count": 2}, "2_other": {"n_repeats": 2, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"])["5_sks"] == {"sks": 2, "red": 2}
    legacy = dataset_metadata(group, from_dataset_config=False)
    assert json.loads(legacy["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 5}}
    assert legacy["ss_bucket_info"] == "null"  # bucketing off, as upstream


def test_bucket_info_counts_repeats(tmp_path):
    write_image(str(tmp_path / "img" / "w.png"), 128, 64)
    write_image(str(tmp_path / "img" / "s.png"), 64, 64)
    toml_text = f"""
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'img'}"
  num_repeats = 3
"""
    group = build_group(toml_text, tmp_path)
    # Buckets (32,96) (32,128) (64,64) (96,32) (128,32) as above. 128x64 (AR 2) is 1.0 away from
    # both 64x64 and 96x32: argmin keeps the first in sorted order, 64x64. 64x64 fits exactly.
    info = group.datasets[0].bucket_info
    assert [b["resolution"] for b in info["buckets"].values()] == [[64, 64]]
    assert sum(b["count"] for b in info["buckets"].values()) == 6
    assert info["mean_img_ar_error"] == pytest.approx((1.0 + 0.0) / 2)


def test_debug_dataset_prints_samples(reg_tree):
    tmp_path, toml_text = reg_tree
    group = build_group(toml_text, tmp_path)
    lines = []
    debug_dataset(group, max_batches=2, print_fn=lines.append)
    text = "\n".join(lines)
    assert "batches per epoch: 6" in text and "epoch: 1" in text
    assert text.count("loss weight") == 8  # 2 batches of 4
    assert "original size (16, 16), crop top left (0, 0), target size (16, 16)" in text
