"""Latent and text-encoder output caches, in memory or on disk in Kohya's npz formats.

Disk formats (readable by upstream, and upstream's readable here):
  `<stem>_<W:04d>x<H:04d>_sdxl.npz` (W x H = the image file's size; `_sd.npz` for SD 1.x/2.x):
      latents float32 (4, h/8, w/8) of the bucket (w, h), unscaled (a VAE posterior sample);
      original_size int64 [W, H]; crop_ltrb float64 [l, t, r, b];
      latents_flipped float32, only with flip_aug;
      alpha_mask float32 (h, w) in [0, 1] of the bucket, only for alpha_mask subsets.
  `<stem>_te_outputs.npz`: hidden_state1 float32 (L, 768), hidden_state2 float32 (L, 1280),
      pool2 float32 (1280,), with L = 77 or n * 75 + 2 for n chunks.

Unlike upstream, a latent cache whose latent size no longer matches the image's bucket (the
resolution or bucket settings changed) is rebuilt, and so is a text-encoder cache whose length no
longer matches the token count (max_token_length changed); `skip_cache_check` trusts any file. As
upstream, an alpha_mask subset's cache needs its `alpha_mask` (a cache written without masks is
made again); a subset without alpha_mask ignores one.

The models are callables, so this module needs no framework:
  vae_encode_fn(images float32 (B, 3, H, W) in [-1, 1]) -> latents (B, 4, H/8, W/8), unscaled
  text_encode_fn(ids1 int32 (B, n, 77), ids2 int32 (B, n, 77)) -> (hidden_state1, hidden_state2, pool2)
"""

import logging
import os
import tempfile
from typing import Callable, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from library.bucketing import trim_and_resize_if_required
from library.captions import caption_for_cached_text_encoder
from library.image_loading import load_image, split_alpha_mask, to_chw_float, to_mask_float

logger = logging.getLogger(__name__)

LATENTS_NPZ_SUFFIX = "_sdxl.npz"
SD_LATENTS_NPZ_SUFFIX = "_sd.npz"  # SD 1.x/2.x (train_network.py), otherwise the same format
TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX = "_te_outputs.npz"


def latents_npz_path(image_path: str, image_size: Tuple[int, int], suffix: str = LATENTS_NPZ_SUFFIX) -> str:
    """Upstream's name (`suffix`: SDXL's or SD's); an old-style `<stem>.npz` next to the image is used if present."""
    stem = os.path.splitext(image_path)[0]
    if os.path.exists(stem + ".npz"):
        return stem + ".npz"
    return f"{stem}_{image_size[0]:04d}x{image_size[1]:04d}{suffix}"


def text_encoder_outputs_npz_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX


def _write_npz(path: str, arrays: dict):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a cache."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_latents_npz(path: str, latents, original_size, crop_ltrb, latents_flipped=None, alpha_mask=None):
    """Keys and dtypes as upstream. Keys already in the file that we do not write (another resolution)
    are kept, as upstream does; an old flipped latent or alpha mask is not (it belongs to the old latents)."""
    arrays = {}
    if os.path.exists(path):
        with np.load(path) as old:
            arrays = {key: old[key] for key in old.files}
        arrays.pop("latents_flipped", None)
        arrays.pop("alpha_mask", None)
    arrays["latents"] = np.asarray(latents, dtype=np.float32)
    arrays["original_size"] = np.array([int(v) for v in original_size], dtype=np.int64)
    arrays["crop_ltrb"] = np.array([float(v) for v in crop_ltrb], dtype=np.float64)
    if latents_flipped is not None:
        arrays["latents_flipped"] = np.asarray(latents_flipped, dtype=np.float32)
    if alpha_mask is not None:
        arrays["alpha_mask"] = np.asarray(alpha_mask, dtype=np.float32)
    _write_npz(path, arrays)


def load_latents_npz(path: str):
    """(latents, original_size [W, H], crop_ltrb, latents_flipped or None, alpha_mask or None)."""
    with np.load(path) as npz:
        if "latents" not in npz:
            raise ValueError(f"{path} has no 'latents'; delete it to cache again")
        latents = npz["latents"]
        original_size = npz["original_size"].tolist()
        crop_ltrb = npz["crop_ltrb"].tolist()
        latents_flipped = npz["latents_flipped"] if "latents_flipped" in npz else None
        alpha_mask = npz["alpha_mask"] if "alpha_mask" in npz else None
    return latents, original_size, crop_ltrb, latents_flipped, alpha_mask


def is_latents_npz_valid(path: str, bucket_reso, flip_aug: bool, skip_cache_check: bool = False,
                         alpha_mask: bool = False) -> bool:
    """The file exists, has the keys, its latents fit the bucket (W, H), and with `alpha_mask` it has
    the bucket's (H, W) alpha mask (upstream's check)."""
    if not os.path.exists(path):
        return False
    if skip_cache_check:
        return True
    expected = (bucket_reso[1] // 8, bucket_reso[0] // 8)
    bucket_hw = (bucket_reso[1], bucket_reso[0])
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            if not {"latents", "original_size", "crop_ltrb"} <= keys:
                return False
            if tuple(npz["latents"].shape[-2:]) != expected:
                logger.info("latent cache %s is for another bucket size; caching again", path)
                return False
            if flip_aug and ("latents_flipped" not in keys or tuple(npz["latents_flipped"].shape[-2:]) != expected):
                return False
            if alpha_mask and ("alpha_mask" not in keys or tuple(npz["alpha_mask"].shape) != bucket_hw):
                logger.info("latent cache %s has no alpha mask for this bucket; caching again", path)
                return False
    except (OSError, ValueError) as e:
        logger.warning("unreadable latent cache %s (%s); caching again", path, e)
        return False
    return True


def save_text_encoder_outputs_npz(path: str, hidden_state1, hidden_state2, pool2):
    _write_npz(
        path,
        {
            "hidden_state1": np.asarray(hidden_state1, dtype=np.float32),
            "hidden_state2": np.asarray(hidden_state2, dtype=np.float32),
            "pool2": np.asarray(pool2, dtype=np.float32),
        },
    )


def load_text_encoder_outputs_npz(path: str):
    with np.load(path) as npz:
        return npz["hidden_state1"], npz["hidden_state2"], npz["pool2"]


def is_text_encoder_outputs_npz_valid(path: str, expected_length: Optional[int], skip_cache_check: bool = False) -> bool:
    if not os.path.exists(path):
        return False
    if skip_cache_check:
        return True
    try:
        with np.load(path) as npz:
            if not {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files):
                return False
            if expected_length is not None and npz["hidden_state1"].shape[0] != expected_length:
                logger.info("text-encoder cache %s has another token length; caching again", path)
                return False
    except (OSError, ValueError) as e:
        logger.warning("unreadable text-encoder cache %s (%s); caching again", path, e)
        return False
    return True


def _batches(items: list, batch_size: int, key: Callable) -> List[list]:
    """Consecutive runs of at most batch_size items sharing key(item)."""
    batches, current = [], []
    for item in items:
        if current and (len(current) >= batch_size or key(item) != key(current[-1])):
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


def cache_latents(
    group,
    vae_encode_fn: Callable[[np.ndarray], np.ndarray],
    vae_batch_size: int = 1,
    cache_to_disk: bool = False,
    skip_cache_check: bool = False,
    num_processes: int = 1,
    process_index: int = 0,
    show_progress: bool = True,
    npz_suffix: str = LATENTS_NPZ_SUFFIX,
):
    """Encode every image of the group once (and its mirror image with flip_aug); disk caches are named with
    `npz_suffix` (`_sdxl.npz`, or `_sd.npz` for SD 1.x/2.x as upstream).

    Images are sorted by bucket area and batched by `vae_batch_size` within one bucket and flip
    setting. With several processes and disk caching, image i is encoded by process
    i % num_processes; the others only record the file name (wait for all before training)."""
    if not group.is_latent_cacheable():
        raise ValueError("when caching latents, neither color_aug nor random_crop can be used")
    # by area as upstream, and by bucket so that equal-area buckets do not interleave
    infos = sorted((info for _, info in group.image_infos()), key=lambda info: (info.bucket_reso[0] * info.bucket_reso[1], info.bucket_reso))
    todo = []
    for i, info in enumerate(infos):
        if cache_to_disk:
            info.latents_npz = latents_npz_path(info.absolute_path, info.image_size, npz_suffix)
            if i % num_processes != process_index:
                continue
            if is_latents_npz_valid(info.latents_npz, info.bucket_reso, info.subset.flip_aug, skip_cache_check,
                                    info.subset.alpha_mask):
                continue
        todo.append(info)

    batches = _batches(todo, vae_batch_size, key=lambda info: (info.bucket_reso, info.subset.flip_aug))
    for batch in tqdm(batches, desc="caching latents", disable=not show_progress or not batches):
        _cache_latents_batch(batch, vae_encode_fn, cache_to_disk)
    group.latents_cached = True


def _cache_latents_batch(batch, vae_encode_fn, cache_to_disk: bool):
    images, alpha_masks, original_sizes, crop_ltrbs = [], [], [], []
    for info in batch:
        image, alpha_mask = split_alpha_mask(load_image(info.absolute_path, alpha=info.subset.alpha_mask))
        image, original_size, crop_ltrb = trim_and_resize_if_required(
            image, info.bucket_reso, info.resized_size, False, info.resize_interpolation
        )
        if alpha_mask is not None:  # resized and cropped as its image (no random crop when caching)
            alpha_mask = to_mask_float(trim_and_resize_if_required(
                alpha_mask, info.bucket_reso, info.resized_size, False, info.resize_interpolation
            )[0])
        images.append(to_chw_float(image))
        alpha_masks.append(alpha_mask)
        original_sizes.append(original_size)
        crop_ltrbs.append(crop_ltrb)
    images = np.stack(images)
    latents = _encode(vae_encode_fn, images, batch)
    flipped = _encode(vae_encode_fn, images[:, :, :, ::-1].copy(), batch) if batch[0].subset.flip_aug else None

    for k, info in enumerate(batch):
        latents_flipped = None if flipped is None else flipped[k]
        if cache_to_disk:
            save_latents_npz(info.latents_npz, latents[k], original_sizes[k], crop_ltrbs[k], latents_flipped,
                             alpha_masks[k])
        else:
            info.latents, info.latents_flipped, info.alpha_mask = latents[k], latents_flipped, alpha_masks[k]
            info.latents_original_size, info.latents_crop_ltrb = original_sizes[k], crop_ltrbs[k]


def _encode(vae_encode_fn, images: np.ndarray, batch) -> np.ndarray:
    latents = np.asarray(vae_encode_fn(images), dtype=np.float32)
    expected = (len(batch), 4, images.shape[2] // 8, images.shape[3] // 8)
    if latents.shape != expected:
        raise ValueError(f"the VAE returned latents of shape {latents.shape}, expected {expected}")
    for k, info in enumerate(batch):
        if np.isnan(latents[k]).any():
            raise ValueError(
                f"NaN detected in latents of {info.absolute_path}; with an fp16 VAE try --no_half_vae"
            )
    return latents


def cache_text_encoder_outputs(
    group,
    text_encode_fn: Callable,
    tokenize_strategy,
    batch_size: int = 1,
    cache_to_disk: bool = False,
    skip_cache_check: bool = False,
    num_processes: int = 1,
    process_index: int = 0,
    show_progress: bool = True,
):
    """Encode every caption once. Only for captions that do not change between steps (see
    `DatasetGroup.is_text_encoder_output_cacheable`); prefix/suffix are applied."""
    if not group.is_text_encoder_output_cacheable():
        raise ValueError(
            "when caching text-encoder outputs, none of caption_dropout_rate, caption_dropout_every_n_epochs, "
            "shuffle_caption, token_warmup_step, caption_tag_dropout_rate or enable_wildcard can be used"
        )
    todo = []
    for i, (_, info) in enumerate(group.image_infos()):
        caption = caption_for_cached_text_encoder(info.subset, info.caption)
        ids1, ids2 = tokenize_strategy.tokenize(caption)
        if cache_to_disk:
            info.text_encoder_outputs_npz = text_encoder_outputs_npz_path(info.absolute_path)
            if i % num_processes != process_index:
                continue
            length = 77 if ids1.shape[0] == 1 else ids1.shape[0] * 75 + 2
            if is_text_encoder_outputs_npz_valid(info.text_encoder_outputs_npz, length, skip_cache_check):
                continue
        todo.append((info, np.asarray(ids1, dtype=np.int32), np.asarray(ids2, dtype=np.int32)))

    batches = _batches(todo, batch_size, key=lambda item: item[1].shape)
    for batch in tqdm(batches, desc="caching text encoder outputs", disable=not show_progress or not batches):
        infos = [item[0] for item in batch]
        outputs = text_encode_fn(np.stack([item[1] for item in batch]), np.stack([item[2] for item in batch]))
        hidden_state1, hidden_state2, pool2 = (np.asarray(o, dtype=np.float32) for o in outputs)
        for k, info in enumerate(infos):
            if np.isnan(hidden_state1[k]).any() or np.isnan(hidden_state2[k]).any() or np.isnan(pool2[k]).any():
                raise ValueError(f"NaN detected in text-encoder outputs for the caption of {info.absolute_path}")
            if cache_to_disk:
                save_text_encoder_outputs_npz(info.text_encoder_outputs_npz, hidden_state1[k], hidden_state2[k], pool2[k])
            else:
                info.text_encoder_outputs = (hidden_state1[k], hidden_state2[k], pool2[k])
    group.text_encoder_outputs_cached = True
