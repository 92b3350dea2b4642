import numpy as np
import pytest
from PIL import Image

from library.bucketing import (
    BucketManager,
    adjust_min_max_bucket_reso_by_steps,
    get_crop_ltrb,
    make_bucket_resolutions,
    resize_image,
    trim_and_resize_if_required,
    verify_bucket_reso_steps,
)


def test_bucket_counts_match_upstream():
    assert len(make_bucket_resolutions((1024, 1024), 256, 1024, 64)) == 25
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41


def test_buckets_up_to_1024_are_every_width_against_1024():
    # With max side 1024, each width w in 256..1024 gets h = min(1024, floor(2^20 / w / 64) * 64)
    # = 1024 (2^20 / w >= 1024), so the buckets are (w, 1024) and their transposes.
    sides = range(256, 1025, 64)
    expected = {(w, 1024) for w in sides} | {(1024, w) for w in sides}
    assert make_bucket_resolutions((1024, 1024), 256, 1024, 64) == sorted(expected)


def test_buckets_up_to_2048_contain_the_sdxl_training_sizes():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    # hand-computed: w=832 -> 2^20 // 832 = 1260 -> floor(1260/64)*64 = 1216, etc.
    for reso in [(1024, 1024), (832, 1216), (896, 1152), (768, 1344), (640, 1600), (512, 2048), (256, 2048)]:
        assert reso in resos and reso[::-1] in resos
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert resos == sorted(resos)


SDXL_BUCKETS = BucketManager(False, (1024, 1024), 256, 2048, 64)
SDXL_BUCKETS.make_buckets()


# (image size, bucket, resized size), derived by hand from the bucket list above:
# - 1200x800, AR 1.5: nearest bucket AR is 1216/832 = 1.4615 (1344/768 = 1.75 is further); the image
#   is wider than the bucket, so the heights match: scale 832/800 = 1.04 -> 1248x832.
# - 500x2000, AR 0.25 = 512/2048 exactly: widths match, scale 1.024 -> 512x2048.
# - 333x333: square bucket, scale 1024/333 -> 1024x1024 (upscaled).
# - 1920x1080, AR 1.778: nearest is 1344/768 = 1.75; heights match, 1920*768/1080 = 1365.3 -> 1365.
# - 800x1200, AR 0.667: nearest is 832/1216 = 0.684; the image is narrower: widths match,
#   scale 832/800 = 1.04 -> 832x1248.
@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((1024, 1024), (1024, 1024), (1024, 1024)),
        ((1200, 800), (1216, 832), (1248, 832)),
        ((500, 2000), (512, 2048), (512, 2048)),
        ((333, 333), (1024, 1024), (1024, 1024)),
        ((1920, 1080), (1344, 768), (1365, 768)),
        ((800, 1200), (832, 1216), (832, 1248)),
    ],
)
def test_select_bucket_with_upscale(size, bucket, resized):
    reso, resized_size, ar_error = SDXL_BUCKETS.select_bucket(*size)
    assert reso == bucket
    assert resized_size == resized
    assert ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


# bucket_no_upscale, max area 1024^2, steps 64, derived by hand:
# - 800x600 is under the max area: kept, bucket = sizes floored to 64 = 768x576.
# - 2000x1000, AR 2: scaled to sqrt(2^20*2) = 1448.2 x 724.1; width-anchored: 1448 -> 1408, height
#   1408/2 = 704; height-anchored: 724 -> 704, width 1408; equal AR errors -> height-anchored:
#   (int(704*2 + .5), 704) = 1408x704, bucket 1408x704.
# - 1100x1000, AR 1.1: 1074.0 x 976.3; width-anchored 1024 x round(931)->896 (AR 1.143);
#   height-anchored 960 x round(1056)->1024 (AR 1.067) wins: resized (1056, 960), bucket 1024x960.
# - 100x70: smaller than every step multiple above 64 -> bucket 64x64, no resize.
@pytest.mark.parametrize(
    "size, bucket, resized",
    [
        ((800, 600), (768, 576), (800, 600)),
        ((2000, 1000), (1408, 704), (1408, 704)),
        ((1100, 1000), (1024, 960), (1056, 960)),
        ((100, 70), (64, 64), (100, 70)),
    ],
)
def test_select_bucket_without_upscale(size, bucket, resized):
    manager = BucketManager(True, (1024, 1024), None, None, 64)
    reso, resized_size, _ = manager.select_bucket(*size)
    assert (reso, resized_size) == (bucket, resized)


# SAI crop conditioning: the image fitted INSIDE the bucket, centred; floor division keeps floats.
# - 1200x800 in 1216x832: the image is wider, widths match: 1216 x 810.67, top = (832-810.67)//2 = 10.
# - 800x1200 in 832x1216: the bucket is wider, heights match: 810.67 x 1216, left = 10.
# - 1920x1080 in 1344x768: widths match, height 756, top = 6.
@pytest.mark.parametrize(
    "bucket, size, ltrb",
    [
        ((1216, 832), (1200, 800), (0, 10.0, 1216, 10.0 + 1216 / 1.5)),
        ((832, 1216), (800, 1200), (10.0, 0, 10.0 + 1216 * 800 / 1200, 1216)),
        ((1344, 768), (1920, 1080), (0, 6.0, 1344, 6.0 + 1344 * 1080 / 1920)),
        ((1024, 1024), (1024, 1024), (0, 0, 1024, 1024)),
    ],
)
def test_get_crop_ltrb(bucket, size, ltrb):
    assert get_crop_ltrb(bucket, size) == pytest.approx(ltrb)
    assert BucketManager.get_crop_ltrb(bucket, size) == pytest.approx(ltrb)


def test_trim_centres_the_crop_and_random_crop_stays_inside():
    # columns numbered 0..1247: centring 1248 -> 1216 cuts 16 on the left
    image = np.tile(np.arange(1248, dtype=np.int64) % 256, (832, 1)).astype(np.uint8)[:, :, None].repeat(3, axis=2)
    trimmed, original, ltrb = trim_and_resize_if_required(image, (1216, 832), (1248, 832))
    assert trimmed.shape == (832, 1216, 3)
    assert trimmed[0, 0, 0] == 16 and trimmed[0, -1, 0] == (16 + 1215) % 256
    assert original == (1248, 832)

    import random

    offsets = set()
    for seed in range(20):
        cropped, _, _ = trim_and_resize_if_required(image, (1216, 832), (1248, 832), random_crop=True, rng=random.Random(seed))
        offsets.add(int(cropped[0, 0, 0]))
    assert len(offsets) > 1 and all(0 <= o <= 32 for o in offsets)


def test_resize_defaults_area_down_lanczos_up():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    # area at exactly half size = mean of 2x2 blocks
    half = resize_image(image, 24, 32)
    blocks = image.reshape(32, 2, 24, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(half.astype(np.float64) - blocks).max() <= 1
    # enlarging uses PIL's lanczos
    up = resize_image(image, 96, 128)
    assert np.array_equal(up, np.asarray(Image.fromarray(image).resize((96, 128), Image.Resampling.LANCZOS)))
    # an explicit method applies both ways: nearest doubles each pixel
    doubled = resize_image(image, 96, 128, "nearest")
    assert np.array_equal(doubled[::2, ::2], image)
    with pytest.raises(ValueError, match="unknown resize interpolation 'sinc'"):
        resize_image(image, 10, 10, "sinc")


def test_min_max_bucket_reso_rounding_and_checks():
    assert adjust_min_max_bucket_reso_by_steps((1024, 1024), 300, 1000, 64) == (256, 1024)
    with pytest.raises(ValueError, match="min_bucket_reso \\(768\\) must be equal or less than the resolution"):
        adjust_min_max_bucket_reso_by_steps((512, 512), 768, 1024, 64)
    with pytest.raises(ValueError, match="max_bucket_reso \\(512\\) must be equal or greater"):
        adjust_min_max_bucket_reso_by_steps((1024, 1024), 256, 512, 64)


def test_sdxl_bucket_steps_must_divide_by_32():
    verify_bucket_reso_steps(64, 32)
    verify_bucket_reso_steps(None, 32)  # bucketing off
    with pytest.raises(ValueError, match="cfg.toml: datasets\\[0\\]: bucket_reso_steps is 48; it must be divisible by 32"):
        verify_bucket_reso_steps(48, 32, "cfg.toml: datasets[0]")
