import os

import numpy as np
import pytest

from library import caching

from tests.dataset_helpers import FakeTokenizeStrategy, build_group, write_image, write_text


class FakeVAE:
    """8x8 average pooling, channels (r, g, b, mean): deterministic and checkable. Records batch
    sizes; returns NaN for images `nan_width` pixels wide (a broken fp16 VAE)."""

    def __init__(self, nan_width=None):
        self.calls = []
        self.nan_width = nan_width

    def __call__(self, images):
        self.calls.append(images.shape[0])
        b, _, h, w = images.shape
        pooled = images.reshape(b, 3, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
        latents = np.concatenate([pooled, pooled.mean(axis=1, keepdims=True)], axis=1)
        if w == self.nan_width:
            latents[:] = np.nan
        return latents


class FakeTextEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, ids1, ids2):
        self.calls += 1
        b, n, _ = ids1.shape
        length = 77 if n == 1 else n * 75 + 2
        base = ids1.reshape(b, -1)[:, :1].astype(np.float32)  # first token id
        return (
            np.ones((b, length, 768), np.float32) * base[:, :, None],
            np.ones((b, length, 1280), np.float32) * 2 * base[:, :, None],
            np.ones((b, 1280), np.float32) * 3 * base,
        )


def config(image_dir, resolution=64, flip=False, extra=""):
    return f"""
[general]
resolution = {resolution}
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 256
bucket_reso_steps = 32
flip_aug = {str(flip).lower()}
caption_extension = ".txt"
{extra}
[[datasets]]
batch_size = 3
  [[datasets.subsets]]
  image_dir = "{image_dir}"
"""


@pytest.fixture
def images(tmp_path):
    for k in range(3):
        write_image(str(tmp_path / "img" / f"i{k}.png"), 96, 96, seed=k)
        write_text(tmp_path / "img" / f"i{k}.txt", f"caption {k}")
    return tmp_path / "img"


def test_latent_disk_cache_format_and_reuse(tmp_path, images):
    group = build_group(config(images), tmp_path)
    uncached, details = group.get_batch(0)
    vae = FakeVAE()
    caching.cache_latents(group, vae, vae_batch_size=2, cache_to_disk=True)
    assert vae.calls == [2, 1]  # 3 images of one bucket, vae_batch_size 2

    # 96x96 images, bucket 64x64 (resolution 64): latents 4 x 8 x 8, named by the image size
    path = images / "i0_0096x0096_sdxl.npz"
    with np.load(path) as npz:
        assert sorted(npz.files) == ["crop_ltrb", "latents", "original_size"]
        assert npz["latents"].dtype == np.float32 and npz["latents"].shape == (4, 8, 8)
        assert npz["original_size"].dtype == np.int64 and npz["original_size"].tolist() == [96, 96]
        assert npz["crop_ltrb"].dtype == np.float64 and npz["crop_ltrb"].tolist() == [0, 0, 64, 64]
    assert not [f for f in os.listdir(images) if f.startswith(".tmp")]

    # the same batch now carries the latents of the pixels the uncached pipeline produced
    assert group.batch_fields[0] == "latents"
    cached, cached_details = group.get_batch(0)
    assert cached_details["image_key"] == details["image_key"]
    assert np.allclose(cached[0], FakeVAE()(uncached[0]), atol=1e-6)
    assert [a.tolist() for a in cached[4:]] == [a.tolist() for a in uncached[4:]]  # sizes unchanged

    again = build_group(config(images), tmp_path)
    vae = FakeVAE()
    caching.cache_latents(again, vae, cache_to_disk=True)
    assert vae.calls == []  # valid caches are read, not recomputed
    assert np.array_equal(again.get_batch(0)[0][0], cached[0])


def test_resolution_change_invalidates_the_latent_cache(tmp_path, images):
    caching.cache_latents(build_group(config(images), tmp_path), FakeVAE(), cache_to_disk=True)
    # resolution 96: the 96x96 images now go to bucket 96x96; the file name (image size) is the
    # same, but its 8x8 latents no longer fit. Upstream's check (keys only) would reuse them.
    group = build_group(config(images, resolution=96), tmp_path)
    vae = FakeVAE()
    caching.cache_latents(group, vae, vae_batch_size=4, cache_to_disk=True)
    assert vae.calls == [3]
    with np.load(images / "i1_0096x0096_sdxl.npz") as npz:
        assert npz["latents"].shape == (4, 12, 12) and npz["crop_ltrb"].tolist() == [0, 0, 96, 96]
    assert group[0][0].shape == (3, 4, 12, 12)
    # skip_cache_check trusts whatever file exists
    vae = FakeVAE()
    caching.cache_latents(build_group(config(images), tmp_path), vae, cache_to_disk=True, skip_cache_check=True)
    assert vae.calls == []


def test_flip_aug_caches_mirrored_latents_in_memory(tmp_path, images):
    group = build_group(config(images, flip=True), tmp_path)
    vae = FakeVAE()
    caching.cache_latents(group, vae, vae_batch_size=3)
    assert vae.calls == [3, 3]  # the images, then their mirror images
    assert not [f for f in os.listdir(images) if f.endswith(".npz")]
    infos = [info for _, info in group.image_infos()]
    for info in infos:
        # pooling 8x8 blocks commutes with a horizontal flip of 64 pixels (8 whole blocks)
        assert np.allclose(info.latents_flipped, info.latents[:, :, ::-1], atol=1e-6)
    seen = set()
    for epoch in (1, 2, 3):
        group.set_current_epoch(epoch)
        arrays, details = group.get_batch(0)
        for k, (key, flipped) in enumerate(zip(details["image_key"], details["flipped"])):
            info = group.datasets[0].image_data[key]
            assert np.array_equal(arrays[0][k], info.latents_flipped if flipped else info.latents)
            seen.add(flipped)
    assert seen == {True, False}


def test_upstream_written_npz_is_used(tmp_path, images):
    # what upstream's save_latents_to_disk writes: np.array of python ints and of the float crop
    latents = np.full((4, 8, 8), 0.25, np.float32)
    for k in range(3):
        np.savez(images / f"i{k}_0096x0096_sdxl.npz", latents=latents, original_size=np.array((96, 96)), crop_ltrb=np.array((0, 0.0, 64, 64.0)))
    group = build_group(config(images), tmp_path)
    vae = FakeVAE()
    caching.cache_latents(group, vae, cache_to_disk=True)
    assert vae.calls == [] and np.all(group[0][0] == 0.25)


def test_batches_group_by_bucket_and_nan_names_the_image(tmp_path):
    write_image(str(tmp_path / "img" / "a_square.png"), 64, 64)
    write_image(str(tmp_path / "img" / "b_wide.png"), 128, 32)
    write_image(str(tmp_path / "img" / "c_square.png"), 64, 64)
    group = build_group(config(tmp_path / "img"), tmp_path)
    vae = FakeVAE()
    caching.cache_latents(group, vae, vae_batch_size=8)
    assert sorted(vae.calls) == [1, 2]  # one batch per bucket
    group = build_group(config(tmp_path / "img"), tmp_path)
    with pytest.raises(ValueError, match="NaN detected in latents of .*b_wide.png"):
        caching.cache_latents(group, FakeVAE(nan_width=128), vae_batch_size=8)


def test_augmentations_that_change_pixels_forbid_latent_caching(tmp_path, images):
    for option in ("color_aug = true", "random_crop = true"):
        group = build_group(config(images, extra=option), tmp_path)
        with pytest.raises(ValueError, match="neither color_aug nor random_crop"):
            caching.cache_latents(group, FakeVAE())


def test_text_encoder_outputs_cache(tmp_path, images):
    tokenizer = FakeTokenizeStrategy()
    group = build_group(config(images, extra='caption_prefix = "pre"'), tmp_path, tokenize_strategy=tokenizer)
    encoder = FakeTextEncoder()
    caching.cache_text_encoder_outputs(group, encoder, tokenizer, batch_size=2, cache_to_disk=True)
    assert encoder.calls == 2
    with np.load(images / "i2_te_outputs.npz") as npz:
        assert sorted(npz.files) == ["hidden_state1", "hidden_state2", "pool2"]
        assert [npz[k].dtype for k in npz.files] == [np.float32] * 3
        assert (npz["hidden_state1"].shape, npz["hidden_state2"].shape, npz["pool2"].shape) == ((77, 768), (77, 1280), (1280,))
        assert npz["pool2"][0] == 3 * ord("p")  # the prefix is part of the cached caption

    assert group.batch_fields[1:4] == ("hidden_state1", "hidden_state2", "pool2")
    arrays, details = group.get_batch(0)
    assert [a.shape for a in arrays[1:4]] == [(3, 77, 768), (3, 77, 1280), (3, 1280)]
    assert details["caption"][0].startswith("pre caption ")

    again = build_group(config(images, extra='caption_prefix = "pre"'), tmp_path, tokenize_strategy=tokenizer)
    encoder = FakeTextEncoder()
    caching.cache_text_encoder_outputs(again, encoder, tokenizer, cache_to_disk=True)
    assert encoder.calls == 0
    # a longer max_token_length (2 chunks -> 152 positions) makes the 77-long caches stale
    long_tokenizer = FakeTokenizeStrategy(n_chunks=2)
    group = build_group(config(images), tmp_path, tokenize_strategy=long_tokenizer)
    encoder = FakeTextEncoder()
    caching.cache_text_encoder_outputs(group, encoder, long_tokenizer, batch_size=3, cache_to_disk=True)
    assert encoder.calls == 1
    with np.load(images / "i0_te_outputs.npz") as npz:
        assert npz["hidden_state1"].shape == (152, 768)


def test_text_encoder_cache_refuses_changing_captions(tmp_path, images):
    for option in ("shuffle_caption = true", "caption_dropout_rate = 0.1", "enable_wildcard = true"):
        group = build_group(config(images, extra=option), tmp_path)
        with pytest.raises(ValueError, match="when caching text-encoder outputs"):
            caching.cache_text_encoder_outputs(group, FakeTextEncoder(), FakeTokenizeStrategy())
