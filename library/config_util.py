"""`--dataset_config` TOML/JSON files and the no-config folder layout -> dataset blueprints -> datasets.

A config has `[general]`, `[[datasets]]` and `[[datasets.subsets]]` tables (Kohya's schema). Each
option is looked up subset -> dataset -> general -> command line -> default, taking the first
value that is set. Everything a user can get wrong (unknown or misplaced keys, wrong types, missing
`image_dir`/`metadata_file`, mixed subset kinds, missing files and folders, bad bucket settings) is
reported here, before any model loads, as a `ConfigError` naming the file, the path inside it
(`datasets[0].subsets[1].image_dir`) and what was expected.
"""

import argparse
import dataclasses
import difflib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import toml

from library.bucketing import INTERPOLATIONS, adjust_min_max_bucket_reso_by_steps

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A dataset configuration the trainer cannot use; the message says where and why."""


def add_config_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--dataset_config", type=Path, default=None, help="config file for detail settings (.toml or .json)")


# ---------------------------------------------------------------------------------------------
# Parameters: what a blueprint holds (names and defaults as upstream, minus its tuple-default bug)


@dataclass
class BaseSubsetParams:
    image_dir: Optional[str] = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: Optional[Tuple[float, float]] = None
    random_crop: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: Dict[str, Any] = field(default_factory=dict)
    resize_interpolation: Optional[str] = None
    alpha_mask: bool = False


@dataclass
class DreamBoothSubsetParams(BaseSubsetParams):
    is_reg: bool = False
    class_tokens: Optional[str] = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    conditioning_data_dir: Optional[str] = None  # loss masks (--masked_loss), upstream's ControlNet-style subset


@dataclass
class FineTuningSubsetParams(BaseSubsetParams):
    metadata_file: Optional[str] = None


@dataclass
class DatasetParams:
    resolution: Optional[Tuple[int, int]] = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    network_multiplier: float = 1.0  # accepted as upstream; upstream's loop ignores it too
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None


@dataclass
class SubsetBlueprint:
    params: Union[DreamBoothSubsetParams, FineTuningSubsetParams]
    where: str  # e.g. "cfg.toml: datasets[0].subsets[1]", used in later error messages


@dataclass
class DatasetBlueprint:
    is_dreambooth: bool
    params: DatasetParams
    subsets: List[SubsetBlueprint]
    where: str


@dataclass
class DatasetGroupBlueprint:
    datasets: List[DatasetBlueprint]


# ---------------------------------------------------------------------------------------------
# Schema: value checkers and where each key may appear


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _check_bool(v):
    if not isinstance(v, bool):
        raise TypeError("expected true or false")
    return v


def _check_int(v):
    if not _is_int(v):
        raise TypeError("expected an integer")
    return v


def _check_number(v):
    if not _is_number(v):
        raise TypeError("expected a number")
    return v


def _check_str(v):
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _check_dict(v):
    if not isinstance(v, dict):
        raise TypeError("expected a table, e.g. {diff_output_preservation = true}")
    return v


def _check_resolution(v):
    if _is_int(v):
        v = [v, v]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v)):
        raise TypeError("expected an integer or [width, height] integers, e.g. 1024 or [1024, 1024]")
    if min(v) <= 0:
        raise ValueError("expected positive sizes")
    return tuple(v)


def _check_float_pair(v):
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)):
        raise TypeError("expected two numbers, e.g. [2.0, 4.0]")
    return (float(v[0]), float(v[1]))


def _check_interpolation(v):
    if v not in INTERPOLATIONS:
        raise ValueError(f"expected one of {', '.join(INTERPOLATIONS)}")
    return v


def _positive(check):
    def checked(v):
        v = check(v)
        if v < 1:
            raise ValueError("expected a value of at least 1")
        return v

    return checked


def _unit_interval(check):
    def checked(v):
        v = check(v)
        if not 0 <= v <= 1:
            raise ValueError("expected a value between 0 and 1")
        return v

    return checked


Checker = Callable[[Any], Any]

SUBSET_ASCENDABLE: Dict[str, Checker] = {
    "color_aug": _check_bool,
    "face_crop_aug_range": _check_float_pair,
    "flip_aug": _check_bool,
    "num_repeats": _check_int,
    "random_crop": _check_bool,
    "shuffle_caption": _check_bool,
    "keep_tokens": _check_int,
    "keep_tokens_separator": _check_str,
    "secondary_separator": _check_str,
    "caption_separator": _check_str,
    "enable_wildcard": _check_bool,
    "token_warmup_min": _check_int,
    "token_warmup_step": _check_number,
    "caption_prefix": _check_str,
    "caption_suffix": _check_str,
    "custom_attributes": _check_dict,
    "resize_interpolation": _check_interpolation,
}
DROPOUT_ASCENDABLE: Dict[str, Checker] = {
    "caption_dropout_every_n_epochs": _check_int,
    "caption_dropout_rate": _unit_interval(_check_number),
    "caption_tag_dropout_rate": _unit_interval(_check_number),
}
DREAMBOOTH_ASCENDABLE: Dict[str, Checker] = {
    "caption_extension": _check_str,
    "class_tokens": _check_str,
    "cache_info": _check_bool,
}
DREAMBOOTH_SUBSET_ONLY: Dict[str, Checker] = {
    "image_dir": _check_str, "is_reg": _check_bool, "alpha_mask": _check_bool, "conditioning_data_dir": _check_str,
}
FINETUNING_SUBSET_ONLY: Dict[str, Checker] = {"metadata_file": _check_str, "image_dir": _check_str, "alpha_mask": _check_bool}
DATASET_ASCENDABLE: Dict[str, Checker] = {
    "batch_size": _positive(_check_int),
    "bucket_no_upscale": _check_bool,
    "bucket_reso_steps": _positive(_check_int),
    "enable_bucket": _check_bool,
    "max_bucket_reso": _positive(_check_int),
    "min_bucket_reso": _positive(_check_int),
    "validation_seed": _check_int,
    "validation_split": _unit_interval(_check_number),
    "resolution": _check_resolution,
    "network_multiplier": _check_number,
    "resize_interpolation": _check_interpolation,
}
GENERAL_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE}
DREAMBOOTH_DATASET_KEYS = dict(GENERAL_KEYS)
FINETUNING_DATASET_KEYS = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE}
DREAMBOOTH_SUBSET_KEYS = {**SUBSET_ASCENDABLE, **DREAMBOOTH_ASCENDABLE, **DROPOUT_ASCENDABLE, **DREAMBOOTH_SUBSET_ONLY}
FINETUNING_SUBSET_KEYS = {**SUBSET_ASCENDABLE, **DROPOUT_ASCENDABLE, **FINETUNING_SUBSET_ONLY}

# command-line names that differ from config names
ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
# dataset options that only the command line sets
ARGPARSE_SPECIFIC = {"prior_loss_weight": _check_number}
# subset-only in a config, but the command line sets their default for every subset, as upstream (--alpha_mask)
ARGPARSE_SUBSET_DEFAULTS = {"alpha_mask": _check_bool}


def _where_allowed(key: str) -> str:
    places = []
    if key in GENERAL_KEYS:
        places.append("[general]")
    if key in DREAMBOOTH_DATASET_KEYS:
        places.append("[[datasets]]")
    if key in DREAMBOOTH_SUBSET_KEYS or key in FINETUNING_SUBSET_KEYS:
        places.append("[[datasets.subsets]]")
    return " or ".join(places)


def _unknown_key_message(key: str, allowed: Dict[str, Checker], finetuning: bool) -> str:
    message = f"unknown key {key!r}"
    if key in ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME:
        return message + f": it is a command-line option; the config name is {ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME[key]!r}"
    if key in ARGPARSE_SPECIFIC:
        return message + ": it can only be given on the command line"
    if key in DREAMBOOTH_SUBSET_KEYS and key not in FINETUNING_SUBSET_KEYS and finetuning:
        return message + ": it is a DreamBooth option, and this is a fine-tuning dataset (its subsets have metadata_file)"
    places = _where_allowed(key)
    if places:
        return message + f" here: {key!r} can only be set in {places}"
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return message + (f"; did you mean {close[0]!r}?" if close else "")


class _Source:
    """Formats error locations: '<file>: datasets[0].subsets[1].image_dir'."""

    def __init__(self, name: str):
        self.name = name

    def at(self, path: str) -> str:
        return f"{self.name}: {path}" if path else self.name

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.at(path)}: {message}")


def _sanitize_table(table, allowed: Dict[str, Checker], source: _Source, path: str, finetuning: bool = False) -> dict:
    if not isinstance(table, dict):
        raise source.error(path, "expected a table")
    result = {}
    for key, value in table.items():
        key_path = f"{path}.{key}" if path else key
        if key not in allowed:
            raise source.error(key_path, _unknown_key_message(key, allowed, finetuning))
        try:
            result[key] = allowed[key](value)
        except (TypeError, ValueError) as e:
            raise source.error(key_path, f"{e}, got {value!r}") from None
    return result


def sanitize_user_config(config: dict, source_name: str = "dataset config") -> dict:
    """Check a loaded config against the schema. Returns a copy with values converted
    (resolution -> (w, h), face_crop_aug_range -> floats). Raises ConfigError."""
    source = _Source(source_name)
    if not isinstance(config, dict):
        raise source.error("", "expected a table with [general] and [[datasets]]")
    for key in config:
        if key not in ("general", "datasets"):
            hint = f"; did you mean {m[0]!r}?" if (m := difflib.get_close_matches(key, ["general", "datasets"], n=1)) else ""
            where = f" ({key!r} can only be set in {_where_allowed(key)})" if _where_allowed(key) else hint
            raise source.error(key, f"unknown top-level key {key!r}: expected only [general] and [[datasets]]{where}")
    general = _sanitize_table(config.get("general", {}), GENERAL_KEYS, source, "general")
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list):
        raise source.error("datasets", "expected an array of tables ([[datasets]])")

    sanitized_datasets = []
    for i, dataset in enumerate(datasets):
        path = f"datasets[{i}]"
        if not isinstance(dataset, dict):
            raise source.error(path, "expected a table")
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise source.error(f"{path}.subsets", "expected an array of tables ([[datasets.subsets]])")
        with_metadata = [j for j, s in enumerate(subsets) if "metadata_file" in s]
        if with_metadata and len(with_metadata) != len(subsets):
            db = [j for j in range(len(subsets)) if j not in with_metadata]
            raise source.error(
                path,
                "DreamBooth subsets (with image_dir, no metadata_file: subsets "
                f"{db}) and fine-tuning subsets (with metadata_file: subsets {with_metadata}) cannot be mixed "
                "in one dataset; put them in separate [[datasets]]",
            )
        is_dreambooth = not with_metadata
        dataset_keys = DREAMBOOTH_DATASET_KEYS if is_dreambooth else FINETUNING_DATASET_KEYS
        subset_keys = DREAMBOOTH_SUBSET_KEYS if is_dreambooth else FINETUNING_SUBSET_KEYS
        sanitized = _sanitize_table(
            {k: v for k, v in dataset.items() if k != "subsets"}, dataset_keys, source, path, not is_dreambooth
        )
        sanitized_subsets = []
        for j, subset in enumerate(subsets):
            subset_path = f"{path}.subsets[{j}]"
            required = "image_dir" if is_dreambooth else "metadata_file"
            if required not in subset:
                raise source.error(
                    f"{subset_path}.{required}",
                    f"required key not set: a {'DreamBooth' if is_dreambooth else 'fine-tuning'} subset needs "
                    f"{required} ({'the folder of its images' if is_dreambooth else 'a .json or .jsonl caption file'})",
                )
            sanitized_subsets.append(_sanitize_table(subset, subset_keys, source, subset_path, not is_dreambooth))
        sanitized["subsets"] = sanitized_subsets
        sanitized_datasets.append(sanitized)
    return {"general": general, "datasets": sanitized_datasets}


def load_user_config(file) -> dict:
    """Read a .toml or .json dataset config. Raises ConfigError naming the file."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{path}: dataset config file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, "r", encoding="utf-8") as f:
                return json.load(f)
        if suffix == ".toml":
            with open(path, "r", encoding="utf-8") as f:
                return toml.load(f)
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse {suffix[1:].upper()}: {e}") from None
    raise ConfigError(f"{path}: unsupported dataset config format {suffix!r}; expected .toml or .json")


# ---------------------------------------------------------------------------------------------
# Command line


def prepare_dataset_args(args: argparse.Namespace):
    """Normalise the dataset flags in place: the `--caption_extention` alias, `--resolution` and
    `--face_crop_aug_range` strings to tuples. Idempotent."""
    if getattr(args, "caption_extention", None) is not None:
        args.caption_extension = args.caption_extention
        args.caption_extention = None
    if isinstance(getattr(args, "resolution", None), str):
        args.resolution = _parse_numbers(args.resolution, int, "--resolution", "'1024' or '1024,1024'")
    if isinstance(getattr(args, "face_crop_aug_range", None), str):
        args.face_crop_aug_range = _parse_numbers(args.face_crop_aug_range, float, "--face_crop_aug_range", "'2.0,4.0'")
        if args.face_crop_aug_range[0] > args.face_crop_aug_range[1]:
            raise ConfigError(f"--face_crop_aug_range: lower bound is above upper bound: {args.face_crop_aug_range}")


def _parse_numbers(text: str, kind, flag: str, example: str):
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2:
        raise ConfigError(f"{flag}: expected {example}, got {text!r}")
    return values


def _argparse_config(args: Optional[argparse.Namespace]) -> dict:
    """Command-line values under their config names, type-checked (a --config_file may put
    anything there)."""
    if args is None:
        return {}
    args = argparse.Namespace(**vars(args))
    prepare_dataset_args(args)
    checkers = {**GENERAL_KEYS, **ARGPARSE_SPECIFIC, **ARGPARSE_SUBSET_DEFAULTS}
    config = {}
    for name, value in vars(args).items():
        key = ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME.get(name, name)
        if key not in checkers or value is None:
            continue
        try:
            config[key] = checkers[key](value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"command line --{name}: {e}, got {value!r}") from None
    return config


def generate_dreambooth_subsets_config_by_subdirs(train_data_dir: Optional[str] = None, reg_data_dir: Optional[str] = None):
    """The no-config layout: each subfolder `<N>_<class tokens>` of the train (or reg) folder is a
    subset repeated N times whose fallback caption is the class tokens. Folders without a number are
    skipped with a warning. Sorted by name (upstream takes the file system's order)."""

    def subsets_of(base_dir: Optional[str], is_reg: bool, flag: str):
        if base_dir is None:
            return []
        if not os.path.isdir(base_dir):
            raise ConfigError(f"command line {flag}: not a folder: {base_dir}")
        subsets = []
        for name in sorted(os.listdir(base_dir)):
            subdir = os.path.join(base_dir, name)
            if not os.path.isdir(subdir):
                continue
            repeats, _, class_tokens = name.partition("_")
            try:
                num_repeats = int(repeats)
            except ValueError:
                logger.warning("ignoring folder without a repeat count (expected '<N>_<class tokens>'): %s", subdir)
                continue
            if num_repeats < 1:
                continue
            subsets.append({"image_dir": subdir, "num_repeats": num_repeats, "is_reg": is_reg, "class_tokens": class_tokens})
        return subsets

    return subsets_of(train_data_dir, False, "--train_data_dir") + subsets_of(reg_data_dir, True, "--reg_data_dir")


def user_config_from_args(args: argparse.Namespace) -> Tuple[dict, str]:
    """The config dict and its display name, from --dataset_config or else from the folder flags."""
    if getattr(args, "dataset_config", None) is not None:
        ignored = [f"--{a}" for a in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, a, None) is not None]
        if ignored:
            logger.warning("ignoring %s because --dataset_config is given", ", ".join(ignored))
        return load_user_config(args.dataset_config), str(args.dataset_config)
    if getattr(args, "in_json", None) is not None:
        subset = {"metadata_file": args.in_json}
        if args.train_data_dir is not None:
            subset["image_dir"] = args.train_data_dir
        return {"datasets": [{"subsets": [subset]}]}, "command line"
    if getattr(args, "train_data_dir", None) is None:
        raise ConfigError("no dataset: pass --dataset_config, or --train_data_dir (with --in_json for fine-tuning)")
    subsets = generate_dreambooth_subsets_config_by_subdirs(args.train_data_dir, getattr(args, "reg_data_dir", None))
    if not any(not s["is_reg"] for s in subsets):
        raise ConfigError(
            f"command line --train_data_dir: no data found in {args.train_data_dir}: it must be the parent of folders "
            "named '<repeats>_<class tokens>' (e.g. '10_sks dog') that hold the images"
        )
    return {"datasets": [{"subsets": subsets}]}, "command line"


# ---------------------------------------------------------------------------------------------
# Blueprint


def _first_set(key: str, layers: List[dict], default):
    for layer in layers:
        value = layer.get(key)
        if value is not None:
            return value
    return default


def _params_from(klass, layers: List[dict]):
    values = {}
    for f in dataclasses.fields(klass):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[f.name] = _first_set(f.name, layers, default)
    return klass(**values)


def generate_blueprint(user_config: dict, args: Optional[argparse.Namespace] = None, source_name: str = "dataset config") -> DatasetGroupBlueprint:
    """Sanitize the config, resolve every option by precedence (subset > dataset > general >
    command line > default) and check what can be checked without loading images."""
    config = sanitize_user_config(user_config, source_name)
    source = _Source(source_name)
    cli = _argparse_config(args)
    masked_loss = bool(getattr(args, "masked_loss", False))
    if getattr(args, "conditioning_data_dir", None) is not None:
        # upstream's sdxl_train_network parses the flag and ignores it
        raise ConfigError("command line --conditioning_data_dir: masks are read from a dataset config: set "
                          "conditioning_data_dir in each [[datasets.subsets]] (with --masked_loss)")
    general = config["general"]
    if not config["datasets"]:
        raise source.error("datasets", "no [[datasets]] defined")

    datasets = []
    for i, dataset_config in enumerate(config["datasets"]):
        path = f"datasets[{i}]"
        subsets_config = dataset_config["subsets"]
        if not subsets_config:
            raise source.error(f"{path}.subsets", "no [[datasets.subsets]] defined for this dataset")
        is_dreambooth = all("metadata_file" not in s for s in subsets_config)
        subset_klass = DreamBoothSubsetParams if is_dreambooth else FineTuningSubsetParams
        params = _params_from(DatasetParams, [dataset_config, general, cli])
        _check_dataset_params(params, source, path)
        subsets = []
        for j, subset_config in enumerate(subsets_config):
            subset_path = f"{path}.subsets[{j}]"
            subset_params = _params_from(subset_klass, [subset_config, dataset_config, general, cli])
            _check_subset_params(subset_params, source, subset_path, masked_loss)
            subsets.append(SubsetBlueprint(subset_params, source.at(subset_path)))
        datasets.append(DatasetBlueprint(is_dreambooth, params, subsets, source.at(path)))
    blueprint = DatasetGroupBlueprint(datasets)
    if masked_loss and not uses_masks(blueprint):
        logger.warning("--masked_loss: no subset has conditioning_data_dir or alpha_mask; the loss is not masked")
    return blueprint


def uses_masks(blueprint: DatasetGroupBlueprint) -> bool:
    """Whether some subset has loss masks (alpha_mask, or conditioning_data_dir with --masked_loss): then every
    batch of the training and validation groups carries masks, as upstream masks the loss whenever a batch has."""
    return any(
        s.params.alpha_mask or getattr(s.params, "conditioning_data_dir", None) is not None
        for d in blueprint.datasets for s in d.subsets
    )


def _check_dataset_params(params: DatasetParams, source: _Source, path: str):
    if params.resolution is None:
        raise source.error(f"{path}.resolution", "resolution is required: set it in [general] or [[datasets]], or pass --resolution")
    if params.enable_bucket:
        try:
            params.min_bucket_reso, params.max_bucket_reso = adjust_min_max_bucket_reso_by_steps(
                params.resolution, params.min_bucket_reso, params.max_bucket_reso, params.bucket_reso_steps, source.at(path)
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_subset_params(params, source: _Source, path: str, masked_loss: bool = False):
    if params.face_crop_aug_range is not None:
        raise source.error(f"{path}.face_crop_aug_range", "face_crop_aug_range is not supported by this trainer")
    if isinstance(params, DreamBoothSubsetParams):
        if not os.path.isdir(params.image_dir):
            raise source.error(f"{path}.image_dir", f"image folder not found: {params.image_dir}")
        if params.conditioning_data_dir is not None:
            where = f"{path}.conditioning_data_dir"
            if not masked_loss:
                raise source.error(where, "conditioning_data_dir (loss masks) needs --masked_loss, as upstream")
            if params.alpha_mask:
                raise source.error(where, "a subset takes its masks from conditioning_data_dir or from alpha_mask, "
                                          "not both")
            if not os.path.isdir(params.conditioning_data_dir):
                raise source.error(where, f"mask folder not found: {params.conditioning_data_dir}")
    else:
        if not os.path.isfile(params.metadata_file):
            raise source.error(f"{path}.metadata_file", f"metadata file not found: {params.metadata_file}")
        if params.image_dir is not None and not os.path.isdir(params.image_dir):
            raise source.error(f"{path}.image_dir", f"image folder not found: {params.image_dir}")


# ---------------------------------------------------------------------------------------------
# Datasets


def generate_dataset_group_by_blueprint(blueprint: DatasetGroupBlueprint, seed: int = 0, tokenize_strategy=None):
    """Build the training group and, where some dataset has validation_split > 0, the validation
    group (else None, also when the split leaves it no image). Buckets are made here; the shuffling
    seed is drawn from `seed` as upstream draws it after `set_seed(args.seed)`.

    The validation group is a `DatasetGroup` like the training one, of the images the split gave to
    validation (regularisation subsets excluded, num_repeats 1): cache its latents and text-encoder
    outputs as the training group's, and see library/validation.py for the evaluation."""
    from library.datasets import DatasetGroup, DreamBoothDataset, FineTuningDataset

    def build(dataset_blueprint: DatasetBlueprint, is_training: bool):
        klass = DreamBoothDataset if dataset_blueprint.is_dreambooth else FineTuningDataset
        return klass(dataset_blueprint.subsets, dataset_blueprint.params, dataset_blueprint.where, is_training)

    dataset_seed = random.Random(seed).randint(0, 2**31)
    with_masks = uses_masks(blueprint)
    for d in blueprint.datasets:
        if d.params.validation_seed is None:
            # upstream shuffles with the global random state here, so its train and validation
            # parts can overlap; the run seed (what --validation_seed's help promises) keeps them
            # complementary
            d.params.validation_seed = seed
    train = [build(d, True) for d in blueprint.datasets]
    val = [build(d, False) for d in blueprint.datasets if d.params.validation_split > 0]
    train_group = DatasetGroup(train, dataset_seed, tokenize_strategy, with_masks)
    if len(train_group) == 0:
        folders = [s.params.image_dir or s.params.metadata_file for d in blueprint.datasets for s in d.subsets]
        raise ConfigError(f"no training images found in {', '.join(map(str, folders))} (extensions: .png .jpg .jpeg .webp .bmp)")
    val_group = DatasetGroup(val, dataset_seed, tokenize_strategy, with_masks) if val else None
    for i, dataset in enumerate(train):
        logger.info("[dataset %d] %s", i, dataset.describe())
    if val_group is not None and len(val_group) == 0:
        # upstream keeps an empty group and then skips validation; None says the same to the trainer
        logger.warning("validation_split leaves no validation images (each subset gives round(images * split)); "
                       "no validation loss will be computed")
        val_group = None
    elif val_group is not None:
        for i, dataset in enumerate(val_group.datasets):
            logger.info("[validation dataset %d] %s", i, dataset.describe())
    return train_group, val_group


def build_dataset_groups(args: argparse.Namespace, tokenize_strategy=None):
    """Everything from parsed flags: config (or folders) -> blueprint -> (train_group, val_group)."""
    user_config, source_name = user_config_from_args(args)
    blueprint = generate_blueprint(user_config, args, source_name)
    seed = args.seed if getattr(args, "seed", None) is not None else 0
    train_group, val_group = generate_dataset_group_by_blueprint(blueprint, seed, tokenize_strategy)
    for group in (train_group, val_group):
        if group is not None:
            group.weighted_captions = bool(getattr(args, "weighted_captions", False))
    return train_group, val_group
