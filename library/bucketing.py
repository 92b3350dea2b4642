"""Aspect-ratio bucketing, resizing and cropping, as Kohya's sd-scripts does them.

Sizes are (width, height) unless a name ends in `_hw`. Images are numpy uint8 arrays (H, W, C).
"""

import logging
import math
import random
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Names accepted by `--resize_interpolation` and the `resize_interpolation` config key ("box" is
# config-only upstream). Upstream resizes with PIL for lanczos and box, and with OpenCV otherwise.
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2_FLAGS = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


def make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64) -> List[Tuple[int, int]]:
    """All bucket sizes whose area is at most that of `max_reso`, sides in [min_size, max_size], sorted."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


def adjust_min_max_bucket_reso_by_steps(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, where=""):
    """Round min down and max up to multiples of the step (with a warning), then check them against
    the resolution. Returns the adjusted (min, max)."""
    prefix = f"{where}: " if where else ""
    if min_bucket_reso % bucket_reso_steps:
        adjusted = min_bucket_reso - min_bucket_reso % bucket_reso_steps
        logger.warning("%smin_bucket_reso adjusted to a multiple of bucket_reso_steps: %d -> %d", prefix, min_bucket_reso, adjusted)
        min_bucket_reso = adjusted
    if max_bucket_reso % bucket_reso_steps:
        adjusted = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
        logger.warning("%smax_bucket_reso adjusted to a multiple of bucket_reso_steps: %d -> %d", prefix, max_bucket_reso, adjusted)
        max_bucket_reso = adjusted
    if min(resolution) < min_bucket_reso:
        raise ValueError(
            f"{prefix}min_bucket_reso ({min_bucket_reso}) must be equal or less than the resolution {tuple(resolution)}"
        )
    if max(resolution) > max_bucket_reso:
        raise ValueError(
            f"{prefix}max_bucket_reso ({max_bucket_reso}) must be equal or greater than the resolution {tuple(resolution)}"
        )
    return min_bucket_reso, max_bucket_reso


def verify_bucket_reso_steps(bucket_reso_steps: Optional[int], min_steps: int, where=""):
    """SDXL needs bucket sizes divisible by 32 (the UNet downsamples latents 4x, latents are /8)."""
    if bucket_reso_steps is not None and bucket_reso_steps % min_steps != 0:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}bucket_reso_steps is {bucket_reso_steps}; it must be divisible by {min_steps}")


def get_crop_ltrb(bucket_reso, image_size) -> Tuple[float, float, float, float]:
    """Stability AI's crop conditioning: where the image would sit if fitted INSIDE the bucket
    (letterboxed), in bucket pixels. Right is kept so that a flip can recompute left. Upstream's
    floor division leaves floats, which the npz cache stores as float64."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


class BucketManager:
    """Chooses the bucket of each image.

    With upscaling allowed, buckets are the predefined list (`make_buckets` or `set_predefined_resos`)
    and an image goes to the one with the closest aspect ratio, resized to cover it. With
    `no_upscale`, each image makes its own bucket: scaled down to `max_reso`'s area if larger, then
    floored to `reso_steps` (the excess is cropped, never padded).
    """

    def __init__(self, no_upscale: bool, max_reso, min_size, max_size, reso_steps):
        if max_size is not None:
            if max_reso is not None and (max_size < max_reso[0] or max_size < max_reso[1]):
                raise ValueError(f"max_bucket_reso ({max_size}) must be at least the resolution {tuple(max_reso)}")
            if min_size is not None and max_size < min_size:
                raise ValueError(f"max_bucket_reso ({max_size}) must be at least min_bucket_reso ({min_size})")
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = None if max_reso is None else max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.predefined_resos: List[Tuple[int, int]] = []

    def make_buckets(self):
        self.set_predefined_resos(make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps))

    def set_predefined_resos(self, resos: Sequence[Tuple[int, int]]):
        self.predefined_resos = list(resos)
        self._predefined_set = set(self.predefined_resos)
        self._predefined_ars = np.array([w / h for w, h in self.predefined_resos])

    def round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width: int, image_height: int):
        """Returns (bucket_reso, resized_size, ar_error), sizes as (W, H)."""
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self._predefined_set:
                # argmin takes the first of equal errors, i.e. the smaller bucket in sorted order
                reso = self.predefined_resos[int(np.abs(self._predefined_ars - aspect_ratio).argmin())]
            # cover the bucket: match the side that leaves the other one at least as large
            if aspect_ratio > reso[0] / reso[1]:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_size = self._shrink_to_max_area(aspect_ratio)
            else:
                resized_size = (image_width, image_height)
            reso = (
                resized_size[0] - resized_size[0] % self.reso_steps,
                resized_size[1] - resized_size[1] % self.reso_steps,
            )
        ar_error = reso[0] / reso[1] - aspect_ratio
        return reso, resized_size, ar_error

    def _shrink_to_max_area(self, aspect_ratio: float) -> Tuple[int, int]:
        # Scale to the max area keeping the aspect ratio, then anchor either the width or the height
        # on a step multiple, whichever keeps the aspect ratio closer (upstream's rounding, kept as is).
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        width_rounded = self.round_to_steps(resized_width)
        ar_width_rounded = width_rounded / self.round_to_steps(width_rounded / aspect_ratio)
        height_rounded = self.round_to_steps(resized_height)
        ar_height_rounded = self.round_to_steps(height_rounded * aspect_ratio) / height_rounded
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            return width_rounded, int(width_rounded / aspect_ratio + 0.5)
        return int(height_rounded * aspect_ratio + 0.5), height_rounded

    get_crop_ltrb = staticmethod(get_crop_ltrb)


def resize_image(image: np.ndarray, width: int, height: int, interpolation: Optional[str] = None) -> np.ndarray:
    """Resize to (width, height). Default: area when shrinking on both sides, lanczos otherwise."""
    src_height, src_width = image.shape[:2]
    if interpolation is None:
        interpolation = "area" if src_width >= width and src_height >= height else "lanczos"
    if interpolation in _PIL_FILTERS:
        return np.asarray(Image.fromarray(image).resize((int(width), int(height)), _PIL_FILTERS[interpolation]))
    if interpolation not in _CV2_FLAGS:
        raise ValueError(f"unknown resize interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}")
    return cv2.resize(image, (int(width), int(height)), interpolation=_CV2_FLAGS[interpolation])


def trim_and_resize_if_required(
    image: np.ndarray,
    bucket_reso,
    resized_size,
    random_crop: bool = False,
    interpolation: Optional[str] = None,
    rng: Optional[random.Random] = None,
):
    """Resize to `resized_size`, then crop to the bucket: centred, or at a random offset.

    Returns (image, original_size (W, H), crop_ltrb). As upstream, crop_ltrb is the SAI letterbox
    formula whatever the actual crop offset was."""
    height, width = image.shape[:2]
    original_size = (width, height)
    if (width, height) != tuple(resized_size):
        image = resize_image(image, resized_size[0], resized_size[1], interpolation)
    height, width = image.shape[:2]
    if width > bucket_reso[0]:
        excess = width - bucket_reso[0]
        left = rng.randint(0, excess) if random_crop else excess // 2
        image = image[:, left : left + bucket_reso[0]]
    if height > bucket_reso[1]:
        excess = height - bucket_reso[1]
        top = rng.randint(0, excess) if random_crop else excess // 2
        image = image[top : top + bucket_reso[1]]
    if image.shape[0] != bucket_reso[1] or image.shape[1] != bucket_reso[0]:
        raise ValueError(f"internal error: image trimmed to {image.shape[1]}x{image.shape[0]}, bucket is {bucket_reso}")
    return image, original_size, get_crop_ltrb(bucket_reso, original_size)
