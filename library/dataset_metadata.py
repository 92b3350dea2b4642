"""The dataset part of the `ss_*` metadata a LoRA file carries (as upstream's train_network writes it)."""

import json
import os
from typing import Dict


def dataset_metadata(group, from_dataset_config: bool) -> Dict[str, str]:
    """`ss_*` keys describing the training data, values as JSON strings.

    With a dataset config: ss_datasets, ss_tag_frequency, ss_dataset_dirs. Without one (folder
    flags): ss_dataset_dirs, ss_reg_dataset_dirs, ss_tag_frequency, ss_bucket_info and the bucket
    flags of the single dataset; the trainer adds the values that come straight from the flags
    (ss_batch_size_per_device, ss_resolution, ss_flip_aug, ...)."""
    if from_dataset_config:
        return _from_config(group)
    if len(group.datasets) != 1:
        raise ValueError(f"expected a single dataset without --dataset_config, found {len(group.datasets)}")
    dataset = group.datasets[0]
    dirs, reg_dirs = {}, {}
    for subset, img_count in zip(dataset.subsets, dataset.subset_img_counts):
        entry = {"n_repeats": subset.num_repeats, "img_count": img_count}
        if dataset.is_dreambooth:
            (reg_dirs if subset.is_reg else dirs)[os.path.basename(subset.image_dir)] = entry
        else:
            dirs[os.path.basename(subset.metadata_file)] = entry
    return {
        "ss_enable_bucket": str(bool(dataset.enable_bucket)),
        "ss_bucket_no_upscale": str(bool(dataset.bucket_no_upscale)),
        "ss_min_bucket_reso": str(dataset.min_bucket_reso),
        "ss_max_bucket_reso": str(dataset.max_bucket_reso),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info),
    }


def _from_config(group) -> Dict[str, str]:
    datasets, tag_frequency, dataset_dirs = [], {}, {}
    for dataset in group.datasets:
        subsets = []
        for subset, img_count in zip(dataset.subsets, dataset.subset_img_counts):
            info = {
                "img_count": img_count,
                "num_repeats": subset.num_repeats,
                "color_aug": bool(subset.color_aug),
                "flip_aug": bool(subset.flip_aug),
                "random_crop": bool(subset.random_crop),
                "shuffle_caption": bool(subset.shuffle_caption),
                "keep_tokens": subset.keep_tokens,
                "keep_tokens_separator": subset.keep_tokens_separator,
                "secondary_separator": subset.secondary_separator,
                "enable_wildcard": bool(subset.enable_wildcard),
                "caption_prefix": subset.caption_prefix,
                "caption_suffix": subset.caption_suffix,
                "resize_interpolation": subset.resize_interpolation,
            }
            dir_name = None
            if subset.image_dir:
                info["image_dir"] = dir_name = os.path.basename(subset.image_dir)
            if dataset.is_dreambooth:
                info["class_tokens"] = subset.class_tokens
                info["is_reg"] = subset.is_reg
                if subset.is_reg:
                    dir_name = None  # reg folders are not listed in ss_dataset_dirs
            else:
                info["metadata_file"] = dir_name = os.path.basename(subset.metadata_file)
            subsets.append(info)
            if dir_name is not None:
                # the same folder may appear in several datasets: "name", "name (2)", ...
                name, n = dir_name, 2
                while name in dataset_dirs:
                    name, n = f"{dir_name} ({n})", n + 1
                dataset_dirs[name] = {"n_repeats": subset.num_repeats, "img_count": img_count}
        datasets.append(
            {
                "is_dreambooth": dataset.is_dreambooth,
                "batch_size_per_device": dataset.batch_size,
                "num_train_images": dataset.num_train_images,
                "num_reg_images": dataset.num_reg_images,
                "resolution": (dataset.width, dataset.height),
                "enable_bucket": bool(dataset.enable_bucket),
                "min_bucket_reso": dataset.min_bucket_reso,
                "max_bucket_reso": dataset.max_bucket_reso,
                "tag_frequency": dataset.tag_frequency,
                "bucket_info": dataset.bucket_info,
                "resize_interpolation": dataset.resize_interpolation,
                "subsets": subsets,
            }
        )
        for dir_name, frequency in dataset.tag_frequency.items():
            tag_frequency.setdefault(dir_name, frequency)  # a folder used by several datasets counts once
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
    }
