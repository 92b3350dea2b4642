"""DreamBooth and fine-tuning datasets: images -> buckets -> batches, as Kohya's sd-scripts builds them.

A batch is a tuple of numpy arrays, so that a graph-mode train step takes it as positional inputs.
Its fields depend on what is cached (see `batch_fields` and `DatasetGroup.batch_fields`):

    0     images (B, 3, H, W) float32 in [-1, 1]      | latents (B, 4, H/8, W/8) float32, unscaled
    1, 2  input_ids1, input_ids2 (B, n, 77) int32      (n = 1, 2 or 3 chunks of 77 tokens)
          then token_weights1, token_weights2 (B, n, 77) float32 with --weighted_captions
          (`DatasetGroup.weighted_captions`: fields 3, 4; see library/prompt_weights)
      or  input_ids [, token_weights] for SD 1.x/2.x's one text encoder (`DatasetGroup.num_text_encoders` 1)
      or  hidden_state1 (B, L, 768), hidden_state2 (B, L, 1280), pool2 (B, 1280) float32
          when the text-encoder outputs are cached (fields 1, 2, 3)
    then  loss_weights (B,) float32         1.0, or prior_loss_weight for regularisation images
          original_sizes_hw (B, 2) int32    size of the image file
          crop_top_lefts (B, 2) int32       SDXL crop conditioning (flip-adjusted)
          target_sizes_hw (B, 2) int32      bucket size
    last, with masked loss only (`DatasetGroup.with_masks`):
          alpha_masks (B, 1, H, W) float32  loss weight per image pixel in [0, 1]: a subset's alpha channel
                                            (alpha_mask) or the red channel of its conditioning_data_dir mask,
                                            resized, cropped and flipped as the image; ones for other subsets

All images of a batch share one bucket. `DatasetGroup.set_current_epoch(e)` reshuffles from
(seed + e); batch i of an epoch, with its augmentations and caption randomness, depends only on
(seed, epoch, i) (and the step, for token warmup), so ranks can shard batches by index.
Epochs count from 1 as upstream's dataset sees them: the trainer calls set_current_epoch(epoch + 1).
"""

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from library import captions as caption_util
from library.caching import load_latents_npz, load_text_encoder_outputs_npz
from library.bucketing import BucketManager, trim_and_resize_if_required, verify_bucket_reso_steps
from library.image_loading import (
    BadImageError, color_aug, get_image_size, glob_images, load_image, load_mask, match_mask_images, split_alpha_mask,
    to_chw_float, to_mask_float,
)

logger = logging.getLogger(__name__)

METADATA_CACHE_FILE = "metadata_cache.json"  # --cache_info: captions and sizes of a DreamBooth folder
SIZE_FIELDS = ("loss_weights", "original_sizes_hw", "crop_top_lefts", "target_sizes_hw")


def batch_fields(latents_cached: bool, text_encoder_outputs_cached: bool, with_masks: bool = False,
                 weighted_captions: bool = False, num_text_encoders: int = 2) -> Tuple[str, ...]:
    """Names of the batch tuple's fields, in order (SD 1.x/2.x, one text encoder: input_ids [, token_weights])."""
    first = ("latents",) if latents_cached else ("images",)
    suffixes = ("",) if num_text_encoders == 1 else ("1", "2")
    text = ("hidden_state1", "hidden_state2", "pool2") if text_encoder_outputs_cached else tuple(
        f"input_ids{k}" for k in suffixes)
    if weighted_captions and not text_encoder_outputs_cached:
        text += tuple(f"token_weights{k}" for k in suffixes)
    masks = ("alpha_masks",) if with_masks else ()
    return first + text + SIZE_FIELDS + masks


def _stack_per_encoder(per_sample: list, dtype) -> Tuple[np.ndarray, ...]:
    """One (B, n, 77) array per text encoder from each sample's tokenizer output: a tuple with one array per encoder
    (SDXL) or a single array (SD 1.x/2.x)."""
    per_sample = [t if isinstance(t, tuple) else (t,) for t in per_sample]
    return tuple(np.stack([t[k] for t in per_sample]).astype(dtype) for k in range(len(per_sample[0])))


@dataclass
class ImageInfo:
    image_key: str
    absolute_path: str
    caption: str
    num_repeats: int
    is_reg: bool
    subset: object  # the subset params it came from (captions and augmentation settings)
    image_size: Optional[Tuple[int, int]] = None  # (W, H) of the file
    bucket_reso: Optional[Tuple[int, int]] = None
    resized_size: Optional[Tuple[int, int]] = None
    resize_interpolation: Optional[str] = None
    mask_path: Optional[str] = None  # its mask in the subset's conditioning_data_dir
    # latent cache, in memory ...
    latents: Optional[np.ndarray] = None
    latents_flipped: Optional[np.ndarray] = None
    alpha_mask: Optional[np.ndarray] = None  # (H, W) float32 of the bucket, for alpha_mask subsets
    latents_original_size: Optional[Tuple[int, int]] = None
    latents_crop_ltrb: Optional[Tuple[float, float, float, float]] = None
    # ... or on disk
    latents_npz: Optional[str] = None
    text_encoder_outputs: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
    text_encoder_outputs_npz: Optional[str] = None


def split_train_val(items: list, is_training_dataset: bool, validation_split: float, validation_seed: Optional[int]) -> list:
    """Upstream's split of one subset: shuffle with `random.Random(validation_seed)` (the permutation upstream's
    `random.seed(validation_seed); random.shuffle(...)` makes), then validation takes the last
    round(n * split) items, as upstream, and training the items before them.

    Upstream gives training the first ceil(n * (1 - split)) items, which is one more, the first validation item,
    when n * split rounds up (n=10, split=0.15: 9 + 2 of 10) or when float error lifts n * (1 - split) above an
    integer (n=10, split=0.7: 4 + 7): the two parts then share an image. Here they never do; in every other
    case both parts are upstream's."""
    items = list(items)
    random.Random(validation_seed).shuffle(items)
    cut = len(items) - round(len(items) * validation_split)
    return items[:cut] if is_training_dataset else items[cut:]


class BaseDataset:
    """Images of one [[datasets]] entry: shared resolution, bucketing and batch size."""

    def __init__(self, params, where: str, is_training_dataset: bool):
        self.params = params
        self.where = where
        self.is_training_dataset = is_training_dataset
        self.batch_size = params.batch_size
        self.width, self.height = params.resolution
        self.enable_bucket = params.enable_bucket
        self.bucket_no_upscale = params.bucket_no_upscale if self.enable_bucket else False
        self.min_bucket_reso = params.min_bucket_reso if self.enable_bucket else None
        self.max_bucket_reso = params.max_bucket_reso if self.enable_bucket else None
        self.bucket_reso_steps = params.bucket_reso_steps if self.enable_bucket else None
        self.prior_loss_weight = params.prior_loss_weight
        self.resize_interpolation = params.resize_interpolation

        self.subsets: list = []  # subset params actually used
        self.subset_img_counts: List[int] = []
        self.image_data: Dict[str, ImageInfo] = {}
        self.num_train_images = 0
        self.num_reg_images = 0
        self.tag_frequency: Dict[str, Dict[str, int]] = {}
        self.bucket_info: Optional[dict] = None

        self.seed = 0
        self.current_epoch = 0
        self.current_step = 0
        self.max_train_steps = 0
        self._bucket_resos: List[Tuple[int, int]] = []
        self._bucket_keys: List[List[str]] = []  # image keys, repeated num_repeats times
        self._batch_index: List[Tuple[int, int]] = []  # (bucket, batch within bucket)
        self._epoch_order: Optional[Tuple[int, List[Tuple[int, int]], List[List[str]]]] = None

    def _add_subset(self, subset, img_count: int):
        self.subsets.append(subset)
        self.subset_img_counts.append(img_count)

    def _register(self, info: ImageInfo):
        info.resize_interpolation = info.subset.resize_interpolation or self.resize_interpolation
        self.image_data[info.image_key] = info

    # ---- buckets and epochs

    def make_buckets(self):
        """Read image sizes, choose each image's bucket and make the batch index."""
        for info in self.image_data.values():
            if info.image_size is None:
                info.image_size = get_image_size(info.absolute_path)
        if self.enable_bucket:
            manager = BucketManager(
                self.bucket_no_upscale, (self.width, self.height), self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
            )
            if not self.bucket_no_upscale:
                manager.make_buckets()
            else:
                logger.info("%s: min/max_bucket_reso are not used with bucket_no_upscale", self.where)
        else:
            manager = BucketManager(False, (self.width, self.height), None, None, None)
            manager.set_predefined_resos([(self.width, self.height)])

        buckets: Dict[Tuple[int, int], List[str]] = {}
        ar_errors = []
        for info in self.image_data.values():
            info.bucket_reso, info.resized_size, ar_error = manager.select_bucket(*info.image_size)
            ar_errors.append(abs(ar_error))
            buckets.setdefault(info.bucket_reso, []).extend([info.image_key] * info.num_repeats)
        self._bucket_resos = sorted(buckets)
        self._bucket_keys = [buckets[reso] for reso in self._bucket_resos]
        self._batch_index = [
            (b, i) for b, keys in enumerate(self._bucket_keys) for i in range(math.ceil(len(keys) / self.batch_size))
        ]
        self._epoch_order = None
        if self.enable_bucket:
            self.bucket_info = {
                "buckets": {
                    i: {"resolution": list(reso), "count": len(keys)}
                    for i, (reso, keys) in enumerate(zip(self._bucket_resos, self._bucket_keys))
                },
                "mean_img_ar_error": float(np.mean(ar_errors)) if ar_errors else 0.0,
            }

    def set_seed(self, seed: int):
        self.seed = seed
        self._epoch_order = None

    def set_current_epoch(self, epoch: int):
        self.current_epoch = epoch

    def set_current_step(self, step: int):
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int):
        self.max_train_steps = max_train_steps

    def _order(self):
        """This epoch's batch order and bucket contents, shuffled from seed + epoch."""
        if self._epoch_order is None or self._epoch_order[0] != self.current_epoch:
            rng = random.Random(self.seed + self.current_epoch)
            batches = list(self._batch_index)
            rng.shuffle(batches)
            buckets = [list(keys) for keys in self._bucket_keys]
            for keys in buckets:
                rng.shuffle(keys)
            self._epoch_order = (self.current_epoch, batches, buckets)
        return self._epoch_order[1], self._epoch_order[2]

    def __len__(self):
        return len(self._batch_index)

    def batch_keys(self, index: int) -> List[str]:
        batches, buckets = self._order()
        bucket, batch = batches[index]
        return buckets[bucket][batch * self.batch_size : (batch + 1) * self.batch_size]

    # ---- checks

    def verify_bucket_reso_steps(self, min_steps: int):
        verify_bucket_reso_steps(self.bucket_reso_steps, min_steps, self.where)

    def is_latent_cacheable(self) -> bool:
        return all(not s.color_aug and not s.random_crop for s in self.subsets)

    def is_text_encoder_output_cacheable(self) -> bool:
        # Upstream forgets wildcards and every-n-epochs dropout; both change the caption.
        return all(
            not (
                s.caption_dropout_rate > 0
                or s.caption_dropout_every_n_epochs > 0
                or s.shuffle_caption
                or s.token_warmup_step > 0
                or s.caption_tag_dropout_rate > 0
                or s.enable_wildcard
            )
            for s in self.subsets
        )

    # ---- batches

    def get_batch(self, index: int, tokenize_strategy, latents_cached: bool, text_encoder_outputs_cached: bool,
                  with_masks: bool = False, weighted_captions: bool = False):
        """(arrays, details): the batch tuple and, for logging, per-sample keys, captions, flips."""
        rng = random.Random(f"{self.seed}/{self.current_epoch}/{index}")
        samples = [
            self._sample(self.image_data[key], rng, latents_cached, text_encoder_outputs_cached, with_masks)
            for key in self.batch_keys(index)
        ]
        first = np.stack([s["pixels"] for s in samples])
        if text_encoder_outputs_cached:
            text = tuple(np.stack([s["text"][k] for s in samples]).astype(np.float32) for k in range(3))
        else:
            if tokenize_strategy is None:
                raise ValueError("the dataset needs a tokenize strategy (or cached text-encoder outputs)")
            if weighted_captions:
                tokens = [tokenize_strategy.tokenize_with_weights(s["caption"]) for s in samples]
                text = _stack_per_encoder([t[0] for t in tokens], np.int32) + \
                    _stack_per_encoder([t[1] for t in tokens], np.float32)
            else:
                tokens = [tokenize_strategy.tokenize(s["caption"]) for s in samples]
                text = _stack_per_encoder(tokens, np.int32)
        arrays = (first,) + text + (
            np.array([s["loss_weight"] for s in samples], dtype=np.float32),
            np.array([s["original_size_hw"] for s in samples], dtype=np.int32),
            np.array([s["crop_top_left"] for s in samples], dtype=np.int32),
            np.array([s["target_size_hw"] for s in samples], dtype=np.int32),
        )
        if with_masks:
            arrays += (np.stack([s["alpha_mask"] for s in samples])[:, None],)
        details = {k: [s[k] for s in samples] for k in ("image_key", "caption", "flipped")}
        return arrays, details

    def _sample(self, info: ImageInfo, rng: random.Random, latents_cached: bool, text_encoder_outputs_cached: bool,
                with_masks: bool) -> dict:
        subset = info.subset
        flipped = subset.flip_aug and rng.random() < 0.5
        if latents_cached:
            pixels, mask, original_size, crop_ltrb = self._cached_latents(info, flipped)
            target_size = (pixels.shape[2] * 8, pixels.shape[1] * 8)
        else:
            pixels, mask, original_size, crop_ltrb = self._load_pixels(info, rng, flipped)
            target_size = (pixels.shape[2], pixels.shape[1])
        if with_masks and mask is None:
            mask = np.ones((target_size[1], target_size[0]), np.float32)  # a subset without masks: as upstream
        # crop_ltrb[2] is the right edge; seen in a mirror it becomes the left one
        crop_left = target_size[0] - crop_ltrb[2] if flipped else crop_ltrb[0]

        if text_encoder_outputs_cached:
            text = self._cached_text(info)
            caption = caption_util.caption_for_cached_text_encoder(subset, info.caption)
        else:
            text = None
            caption = caption_util.process_caption(
                subset, info.caption, rng, self.current_epoch, self.current_step, self.max_train_steps
            )
        return {
            "image_key": info.image_key,
            "pixels": pixels,
            "text": text,
            "caption": caption,
            "flipped": flipped,
            "loss_weight": self.prior_loss_weight if info.is_reg else 1.0,
            "original_size_hw": (int(original_size[1]), int(original_size[0])),
            "crop_top_left": (int(crop_ltrb[1]), int(crop_left)),
            "target_size_hw": (int(target_size[1]), int(target_size[0])),
            "alpha_mask": mask if with_masks else None,
        }

    def _cached_latents(self, info: ImageInfo, flipped: bool):
        """(latents, mask float32 (H, W) or None, original_size, crop_ltrb) from the cache; an alpha_mask
        subset's mask is cached with the latents, a conditioning_data_dir mask is read and fitted as the image
        was when it was cached (centred: caching forbids random_crop)."""
        if info.latents is not None:
            latents = info.latents_flipped if flipped else info.latents
            original_size, crop_ltrb, mask = info.latents_original_size, info.latents_crop_ltrb, info.alpha_mask
        else:
            if info.latents_npz is None:
                raise ValueError(f"latents of {info.absolute_path} are not cached")
            latents, original_size, crop_ltrb, latents_flipped, mask = load_latents_npz(info.latents_npz)
            if flipped:
                if latents_flipped is None:
                    raise ValueError(f"{info.latents_npz} has no latents_flipped; cache again with flip_aug")
                latents = latents_flipped
        if not info.subset.alpha_mask:
            mask = None  # a mask cached by an earlier alpha_mask run is not this run's
        elif mask is None:
            raise ValueError(f"{info.latents_npz}: no alpha_mask for this alpha_mask subset; cache again without "
                             "--skip_cache_check")
        if info.mask_path is not None:  # fitted as library.caching fitted the image
            mask = to_mask_float(trim_and_resize_if_required(
                load_mask(info.mask_path), info.bucket_reso, info.resized_size, False, info.resize_interpolation
            )[0])
        if mask is not None and flipped:
            mask = mask[:, ::-1]
        return latents, mask, original_size, crop_ltrb

    def _cached_text(self, info: ImageInfo):
        if info.text_encoder_outputs is not None:
            return info.text_encoder_outputs
        if info.text_encoder_outputs_npz is None:
            raise ValueError(f"text-encoder outputs of {info.absolute_path} are not cached")
        return load_text_encoder_outputs_npz(info.text_encoder_outputs_npz)

    def _load_pixels(self, info: ImageInfo, rng: random.Random, flipped: bool):
        """(pixels, mask float32 (H, W) or None, original_size, crop_ltrb) from the image file (and its mask)."""
        subset = info.subset
        image, mask = split_alpha_mask(load_image(info.absolute_path, alpha=subset.alpha_mask))
        if info.mask_path is not None:
            mask = load_mask(info.mask_path)
        rng_state = rng.getstate()
        image, original_size, crop_ltrb = self._fit_to_bucket(image, info, rng)
        if mask is not None:
            # the mask is resized and cropped as the image: the same call, drawing the same crop offsets
            mask_rng = random.Random()
            mask_rng.setstate(rng_state)
            mask = to_mask_float(self._fit_to_bucket(mask, info, mask_rng)[0])
        if subset.color_aug:
            image = color_aug(image, rng)
        if flipped:
            image = image[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        return to_chw_float(image), mask, original_size, crop_ltrb

    def _fit_to_bucket(self, image: np.ndarray, info: ImageInfo, rng: random.Random):
        """(image, original_size, crop_ltrb): resized and cropped to the image's bucket, or only cropped
        without bucketing (upstream's uncached path)."""
        if self.enable_bucket:
            return trim_and_resize_if_required(
                image, info.bucket_reso, info.resized_size, info.subset.random_crop, info.resize_interpolation, rng
            )
        image = self._crop_without_bucket(image, info, rng)
        return image, (image.shape[1], image.shape[0]), (0, 0, 0, 0)

    def _crop_without_bucket(self, image: np.ndarray, info: ImageInfo, rng: random.Random) -> np.ndarray:
        # Upstream does not resize here (only the latent cache does): a larger image needs
        # random_crop, a smaller one is an error.
        height, width = image.shape[:2]
        if height > self.height or width > self.width:
            if not info.subset.random_crop:
                raise BadImageError(
                    f"image {width}x{height} is larger than the resolution {self.width}x{self.height} and neither "
                    f"bucketing nor random_crop is enabled: {info.absolute_path}"
                )
            if height > self.height:
                top = rng.randint(0, height - self.height)
                image = image[top : top + self.height]
            if width > self.width:
                left = rng.randint(0, width - self.width)
                image = image[:, left : left + self.width]
        if image.shape[0] != self.height or image.shape[1] != self.width:
            raise BadImageError(
                f"image {width}x{height} is smaller than the resolution {self.width}x{self.height} "
                f"(enable bucketing or cache latents to resize it): {info.absolute_path}"
            )
        return image

    def describe(self) -> str:
        text = f"{self.where}: {len(self.image_data)} images, batch_size {self.batch_size}, resolution {self.width}x{self.height}"
        if self.enable_bucket:
            text += (
                f", buckets {self.min_bucket_reso}-{self.max_bucket_reso} step {self.bucket_reso_steps}"
                f"{' no_upscale' if self.bucket_no_upscale else ''}"
            )
        return text


class DreamBoothDataset(BaseDataset):
    """Subsets are folders of images with `<stem><caption_extension>` captions (class tokens as the
    fallback). Regularisation images are repeated until they match the training images."""

    is_dreambooth = True

    def __init__(self, subset_blueprints, params, where: str = "dataset", is_training_dataset: bool = True):
        super().__init__(params, where, is_training_dataset)
        seen_dirs = set()
        reg_infos: List[ImageInfo] = []
        for blueprint in subset_blueprints:
            subset = blueprint.params
            if subset.caption_extension and not subset.caption_extension.startswith("."):
                subset.caption_extension = "." + subset.caption_extension
            num_repeats = subset.num_repeats if is_training_dataset else 1
            if num_repeats < 1:
                logger.warning("%s: ignored, num_repeats is %d", blueprint.where, num_repeats)
                continue
            if subset.image_dir in seen_dirs:
                logger.warning("%s: ignored, image_dir %s is already a subset of this dataset", blueprint.where, subset.image_dir)
                continue
            paths, captions, sizes = self._load_folder(subset)
            mask_paths = [None] * len(paths)
            if subset.conditioning_data_dir is not None:
                mask_paths = match_mask_images(paths, subset.conditioning_data_dir, blueprint.where)
                check_mask_sizes(paths, sizes, mask_paths)
            if params.validation_split > 0:
                if subset.is_reg:
                    kept = range(len(paths)) if is_training_dataset else []  # reg images are never validated
                else:
                    kept = split_train_val(range(len(paths)), is_training_dataset, params.validation_split, params.validation_seed)
                paths, captions, sizes, mask_paths = (
                    [values[k] for k in kept] for values in (paths, captions, sizes, mask_paths)
                )
            if not paths:
                logger.warning("%s: ignored, no images in %s", blueprint.where, subset.image_dir)
                continue
            seen_dirs.add(subset.image_dir)

            caption_util.count_tags(captions, self.tag_frequency.setdefault(os.path.basename(subset.image_dir), {}))
            for path, caption, size, mask_path in zip(paths, captions, sizes, mask_paths):
                info = ImageInfo(path, path, caption, num_repeats, subset.is_reg, subset, image_size=size,
                                 mask_path=mask_path)
                if subset.is_reg:
                    reg_infos.append(info)
                else:
                    self._register(info)
            if subset.is_reg:
                self.num_reg_images += num_repeats * len(paths)
            else:
                self.num_train_images += num_repeats * len(paths)
            self._add_subset(subset, len(paths))
        self._balance_reg_images(reg_infos)

    def _load_folder(self, subset):
        """(paths, captions, sizes) of a subset folder; with cache_info, from and to its
        metadata_cache.json ({path: {caption, resolution}}), as upstream."""
        info_file = os.path.join(subset.image_dir, METADATA_CACHE_FILE)
        if subset.cache_info and os.path.isfile(info_file):
            with open(info_file, "r", encoding="utf-8") as f:
                metas = json.load(f)
            paths = list(metas)
            return paths, [metas[p]["caption"] for p in paths], [tuple(metas[p]["resolution"]) for p in paths]
        paths = glob_images(subset.image_dir)
        captions = [self._caption_for(path, subset) for path in paths]
        sizes = [None] * len(paths)
        if subset.cache_info:
            sizes = [get_image_size(path) for path in paths]
            metas = {p: {"caption": c, "resolution": list(s)} for p, c, s in zip(paths, captions, sizes)}
            tmp_file = info_file + ".tmp"
            with open(tmp_file, "w", encoding="utf-8") as f:
                json.dump(metas, f, ensure_ascii=False, indent=2)
            os.replace(tmp_file, info_file)
        return paths, captions, sizes

    @staticmethod
    def _caption_for(path: str, subset) -> str:
        caption = caption_util.read_caption_file(path, subset.caption_extension, subset.enable_wildcard)
        if caption is not None:
            return caption
        if subset.class_tokens is None:
            logger.warning("no caption file and no class_tokens, using an empty caption: %s", path)
            return ""
        return subset.class_tokens

    def _balance_reg_images(self, reg_infos: List[ImageInfo]):
        """Upstream's rule: register reg images in order until they reach the number of training
        images (with repeats); if they fall short, add one repeat per image in turn until equal.
        Reg images beyond that number are never used."""
        if not reg_infos:
            return
        if self.num_reg_images > self.num_train_images:
            logger.warning("%s: more regularisation images than training images; some are not used", self.where)
        count, first_pass = 0, True
        while count < self.num_train_images:
            for info in reg_infos:
                if first_pass:
                    self._register(info)
                    count += info.num_repeats
                else:
                    info.num_repeats += 1
                    count += 1
                if count >= self.num_train_images:
                    break
            first_pass = False


def check_mask_sizes(image_paths: List[str], sizes: List[Optional[Tuple[int, int]]], mask_paths: List[str]):
    """Each mask has its image's size (it is resized and cropped with it); an error naming both otherwise."""
    for path, size, mask_path in zip(image_paths, sizes, mask_paths):
        size = size or get_image_size(path)
        mask_size = get_image_size(mask_path)
        if tuple(mask_size) != tuple(size):
            raise BadImageError(
                f"mask {mask_path} is {mask_size[0]}x{mask_size[1]}, its image {path} is {size[0]}x{size[1]}: "
                "a mask must have its image's size"
            )


class FineTuningDataset(BaseDataset):
    """Subsets are metadata files: JSON `{image: {caption, tags, image_size}}` or JSONL lines
    `{image_path, caption, tags, image_size}`; tags are appended to the caption."""

    is_dreambooth = False

    def __init__(self, subset_blueprints, params, where: str = "dataset", is_training_dataset: bool = True):
        super().__init__(params, where, is_training_dataset)
        seen_files = set()
        for blueprint in subset_blueprints:
            subset = blueprint.params
            num_repeats = subset.num_repeats if is_training_dataset else 1
            if num_repeats < 1:
                logger.warning("%s: ignored, num_repeats is %d", blueprint.where, num_repeats)
                continue
            if subset.metadata_file in seen_files:
                logger.warning("%s: ignored, metadata_file %s is already a subset of this dataset", blueprint.where, subset.metadata_file)
                continue
            metadata = _read_metadata(subset.metadata_file)
            keys = list(metadata)
            if params.validation_split > 0:
                # upstream keeps every image in both parts here; we split as for DreamBooth
                keys = split_train_val(keys, is_training_dataset, params.validation_split, params.validation_seed)
            if not keys:
                logger.warning("%s: ignored, no images in %s", blueprint.where, subset.metadata_file)
                continue
            seen_files.add(subset.metadata_file)

            tags_list = []
            for key in keys:
                entry = metadata[key]
                caption, tags = _caption_with_tags(entry.get("caption") or "", entry.get("tags"), subset)
                if tags:
                    tags_list.append(tags)
                info = ImageInfo(key, _absolute_image_path(key, subset, blueprint.where), caption, num_repeats, False, subset)
                if entry.get("image_size") is not None:
                    info.image_size = tuple(int(v) for v in entry["image_size"])
                self._register(info)
            self.num_train_images += len(keys) * num_repeats
            caption_util.count_tags(tags_list, self.tag_frequency.setdefault(os.path.basename(subset.metadata_file), {}))
            self._add_subset(subset, len(keys))


def _read_metadata(path: str) -> dict:
    try:
        with open(path, "rt", encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                metadata = {}
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    entry = json.loads(line)
                    if "image_path" not in entry:
                        raise ValueError(f"line {line_no} has no image_path")
                    metadata[entry.pop("image_path")] = entry
                return metadata
            metadata = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read metadata file {path}: {e}") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata file {path}: expected an object mapping image paths to entries")
    return metadata


def _caption_with_tags(caption: str, tags: Optional[str], subset) -> Tuple[str, Optional[str]]:
    separator = subset.caption_separator
    if not tags:
        return caption, None
    if subset.enable_wildcard:
        # tags are one line, appended to every caption line
        tags = tags.replace("\n", separator)
        lines = [line for line in caption.split("\n") if line.strip()]
        return "\n".join(f"{line}{separator}{tags}" for line in lines), tags
    return (caption + separator if caption else "") + tags, tags


def _absolute_image_path(key: str, subset, where: str) -> str:
    if os.path.isabs(key):
        return key
    if subset.image_dir is None:
        raise ValueError(f"{where}: image_dir is required because {subset.metadata_file} has relative image paths ({key})")
    return os.path.join(subset.image_dir, key)


class DatasetGroup:
    """All training datasets: the sequence of batches the trainer iterates.

    `len(group)` is the number of batches per epoch; `group[i]` is batch i of the current epoch.
    Batches of all datasets are interleaved by a permutation seeded from seed + epoch (upstream's
    DataLoader shuffle). `with_masks`: batches end with the loss masks (masked loss)."""

    def __init__(self, datasets: Sequence[BaseDataset], seed: int = 0, tokenize_strategy=None, with_masks: bool = False):
        self.datasets = list(datasets)
        self.seed = seed
        self.tokenize_strategy = tokenize_strategy
        self.with_masks = with_masks
        self.latents_cached = False
        self.text_encoder_outputs_cached = False
        self.weighted_captions = False  # --weighted_captions: batches carry the token weights
        self.num_text_encoders = 2  # SDXL's; SD 1.x/2.x's trainer sets 1 (one token-id field)
        self.current_epoch = 0
        for dataset in self.datasets:
            dataset.make_buckets()
            dataset.set_seed(seed)
        self._permutation: Optional[Tuple[int, List[Tuple[int, int]]]] = None

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def batch_fields(self) -> Tuple[str, ...]:
        """Names of the fields of `group[i]`, in order."""
        return batch_fields(self.latents_cached, self.text_encoder_outputs_cached, self.with_masks,
                            self.weighted_captions, self.num_text_encoders)

    def latent_shape(self, batch) -> Tuple[int, ...]:
        """(B, 4, h, w) of a batch's latents: the cached latents' shape, or the images' at 1/8."""
        first = batch[0]
        if self.batch_fields[0] == "latents":
            return tuple(first.shape)
        return (first.shape[0], 4, first.shape[2] // 8, first.shape[3] // 8)

    def image_infos(self) -> Iterator[Tuple[BaseDataset, ImageInfo]]:
        """Every registered image once (not per repeat), for caching."""
        for dataset in self.datasets:
            for info in dataset.image_data.values():
                yield dataset, info

    def set_current_epoch(self, epoch: int):
        self.current_epoch = epoch
        for dataset in self.datasets:
            dataset.set_current_epoch(epoch)

    def set_current_step(self, step: int):
        for dataset in self.datasets:
            dataset.set_current_step(step)

    def set_max_train_steps(self, max_train_steps: int):
        for dataset in self.datasets:
            dataset.set_max_train_steps(max_train_steps)

    def verify_bucket_reso_steps(self, min_steps: int):
        for dataset in self.datasets:
            dataset.verify_bucket_reso_steps(min_steps)

    def is_latent_cacheable(self) -> bool:
        return all(d.is_latent_cacheable() for d in self.datasets)

    def is_text_encoder_output_cacheable(self) -> bool:
        return all(d.is_text_encoder_output_cacheable() for d in self.datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _locate(self, index: int) -> Tuple[int, int]:
        if self._permutation is None or self._permutation[0] != self.current_epoch:
            entries = [(d, i) for d, dataset in enumerate(self.datasets) for i in range(len(dataset))]
            random.Random(self.seed + self.current_epoch).shuffle(entries)
            self._permutation = (self.current_epoch, entries)
        return self._permutation[1][index]

    def get_batch(self, index: int):
        """(arrays, details) for batch `index` of the current epoch; details has per-sample
        image_key, caption and flipped lists (for --debug_dataset and logs)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range (0..{len(self) - 1})")
        dataset_index, local_index = self._locate(index)
        return self.datasets[dataset_index].get_batch(
            local_index, self.tokenize_strategy, self.latents_cached, self.text_encoder_outputs_cached, self.with_masks,
            self.weighted_captions,
        )

    def __getitem__(self, index: int) -> Tuple[np.ndarray, ...]:
        return self.get_batch(index)[0]


def debug_dataset(group: DatasetGroup, epochs: int = 1, max_batches: Optional[int] = None, print_fn=print):
    """`--debug_dataset`: print what the pipeline produces, batch by batch, without training."""
    print_fn(f"batches per epoch: {len(group)}; fields: {', '.join(group.batch_fields)}")
    step = 1
    for epoch in range(1, epochs + 1):
        group.set_current_epoch(epoch)
        print_fn(f"epoch: {epoch}")
        for index in range(len(group) if max_batches is None else min(max_batches, len(group))):
            group.set_current_step(step)
            arrays, details = group.get_batch(index)
            print_fn(f"step {step} ({index + 1}/{len(group)}): {group.batch_fields[0]} {tuple(arrays[0].shape)}")
            fields = dict(zip(group.batch_fields, arrays))
            for j, key in enumerate(details["image_key"]):
                print_fn(
                    f"  {key}: loss weight {fields['loss_weights'][j]:g}, caption {details['caption'][j]!r}, "
                    f"original size {tuple(fields['original_sizes_hw'][j])}, crop top left {tuple(fields['crop_top_lefts'][j])}, "
                    f"target size {tuple(fields['target_sizes_hw'][j])}, flipped {details['flipped'][j]}"
                    + (f", mask mean {fields['alpha_masks'][j].mean():.3f}" if "alpha_masks" in fields else "")
                )
            step += 1
