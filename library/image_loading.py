"""Finding, measuring and loading training images and their loss masks; colour augmentation; array conversion."""

import glob
import os
import random
from typing import List, Tuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Upstream's list (avif/jxl only exist there through optional plugins).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class BadImageError(ValueError):
    """An image that cannot be used for training; the message names the file."""


def glob_images(directory: str) -> List[str]:
    """Images directly inside `directory` (any case of the extension), sorted by path."""
    paths = set()
    for ext in IMAGE_EXTENSIONS:
        for variant in (ext, ext.upper()):
            paths.update(glob.glob(os.path.join(glob.escape(directory), "*" + variant)))
    return sorted(paths)


def get_image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as e:
        raise BadImageError(f"cannot read image {path}: {e}") from None
    if width <= 0 or height <= 0:
        raise BadImageError(f"image has zero size: {path}")
    return width, height


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """RGB uint8 array (H, W, 3), or RGBA (H, W, 4) with `alpha` (opaque where the file has no alpha channel),
    as upstream. Truncated or unreadable files raise BadImageError naming them."""
    mode = "RGBA" if alpha else "RGB"
    try:
        with Image.open(path) as image:
            image = image.convert(mode) if image.mode != mode else image
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise BadImageError(f"cannot load image {path}: {e}") from None
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise BadImageError(f"image has zero size: {path}")
    return array


def split_alpha_mask(image: np.ndarray):
    """(RGB (H, W, 3), alpha uint8 (H, W)) of an RGBA array; (image, None) of an RGB one."""
    if image.shape[2] == 4:
        return image[:, :, :3], image[:, :, 3]
    return image, None


def load_mask(path: str) -> np.ndarray:
    """A mask image of `conditioning_data_dir` as uint8 (H, W): its red channel, as upstream reads it
    (white trains, black is ignored, grey weighs in between)."""
    return load_image(path)[:, :, 0]


def match_mask_images(image_paths: List[str], mask_dir: str, where: str) -> List[str]:
    """The mask of each image: the file in `mask_dir` with the image's name and any image extension (the first
    in sorted order when several match), as upstream pairs conditioning images. A missing mask, or a mask
    without an image, is an error naming the files."""
    masks = {}
    for path in glob_images(mask_dir):
        masks.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    stems = [os.path.splitext(os.path.basename(path))[0] for path in image_paths]
    missing = [path for path, stem in zip(image_paths, stems) if stem not in masks]
    if missing:
        raise BadImageError(
            f"{where}: no mask in conditioning_data_dir {mask_dir} for {len(missing)} image(s): {', '.join(missing)} "
            "(a mask has its image's file name, with any image extension)"
        )
    extra = sorted(set(masks) - set(stems))
    if extra:
        raise BadImageError(
            f"{where}: {len(extra)} mask(s) in conditioning_data_dir {mask_dir} have no image: "
            f"{', '.join(masks[stem] for stem in extra)}"
        )
    return [masks[stem] for stem in stems]


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Upstream's weak colour augmentation: with probability 0.33, either a hue shift of up to 8
    OpenCV hue units or a gamma in [0.95, 1.05] (half the time each)."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-8, 8) % 180
        hsv[:, :, 0] = ((hsv[:, :, 0] + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def to_mask_float(mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> float32 (H, W) in [0, 1], the loss weight of each pixel (upstream's `mask / 255`)."""
    return mask.astype(np.float32) / 255.0


def to_chw_float(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], as torchvision's ToTensor + Normalize(0.5, 0.5)."""
    return (np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / 127.5) - 1.0
