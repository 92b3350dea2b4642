import json

import pytest

from library import config_util
from library.config_util import ConfigError, DreamBoothSubsetParams, FineTuningSubsetParams

from tests.dataset_helpers import parse_args


@pytest.fixture
def dirs(tmp_path):
    for name in ("char", "reg", "hoge", "fuga", "piyo"):
        (tmp_path / name).mkdir()
    (tmp_path / "piyo" / "piyo_md.json").write_text(json.dumps({"a.png": {"caption": "x"}}))
    return tmp_path


def blueprint_of(text, tmp_path, argv=(), name="config.toml"):
    path = tmp_path / name
    path.write_text(text)
    args = parse_args(["--dataset_config", str(path), *argv])
    user_config, source = config_util.user_config_from_args(args)
    return config_util.generate_blueprint(user_config, args, source)


def error_of(text, tmp_path, argv=(), name="config.toml"):
    with pytest.raises(ConfigError) as info:
        blueprint_of(text, tmp_path, argv, name)
    return str(info.value)


def test_reference_example_parses(dirs):
    text = f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
[[datasets]]
resolution = [1024, 1024]
batch_size = 2
enable_bucket = true
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = "{dirs / 'char'}"
  class_tokens = "sks girl"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "{dirs / 'reg'}"
  is_reg = true
  class_tokens = "girl"
"""
    group = blueprint_of(text, dirs)
    (dataset,) = group.datasets
    assert dataset.is_dreambooth
    p = dataset.params
    assert (p.resolution, p.batch_size, p.enable_bucket, p.bucket_no_upscale) == ((1024, 1024), 2, True, True)
    assert (p.min_bucket_reso, p.max_bucket_reso, p.bucket_reso_steps) == (256, 1024, 64)  # CLI defaults
    char, reg = (s.params for s in dataset.subsets)
    assert isinstance(char, DreamBoothSubsetParams)
    assert (char.image_dir, char.class_tokens, char.num_repeats, char.is_reg) == (str(dirs / "char"), "sks girl", 10, False)
    assert (reg.class_tokens, reg.num_repeats, reg.is_reg) == ("girl", 1, True)
    for s in (char, reg):  # from [general]
        assert (s.shuffle_caption, s.caption_extension, s.keep_tokens) == (True, ".txt", 1)
        assert (s.caption_separator, s.keep_tokens_separator) == (",", "")  # no tuple defaults
    assert dataset.subsets[1].where.endswith("config.toml: datasets[0].subsets[1]")


def test_docs_example_with_dreambooth_and_finetuning_datasets(dirs):
    # the shape of upstream's config_README example: two datasets, keep_tokens set at each level
    text = f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{dirs / 'hoge'}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{dirs / 'fuga'}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{dirs / 'reg'}'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [768, 768]
batch_size = 2
flip_aug = true
color_aug = false

  [[datasets.subsets]]
  image_dir = '{dirs / 'piyo'}'
  metadata_file = '{dirs / 'piyo' / 'piyo_md.json'}'
"""
    db, ft = blueprint_of(text, dirs).datasets
    assert (db.is_dreambooth, ft.is_dreambooth) == (True, False)
    assert (db.params.resolution, db.params.batch_size) == ((512, 512), 4)
    assert (ft.params.resolution, ft.params.batch_size) == ((768, 768), 2)
    assert [s.params.keep_tokens for s in db.subsets] == [2, 3, 1]
    (piyo,) = ft.subsets
    assert isinstance(piyo.params, FineTuningSubsetParams)
    assert (piyo.params.keep_tokens, piyo.params.flip_aug, piyo.params.shuffle_caption) == (1, True, True)
    assert piyo.params.metadata_file == str(dirs / "piyo" / "piyo_md.json")


def test_precedence_subset_dataset_general_cli_default(dirs):
    text = f"""
[general]
resolution = 512
keep_tokens = 1
caption_prefix = "general"
caption_suffix = "general"
[[datasets]]
keep_tokens = 2
caption_prefix = "dataset"
  [[datasets.subsets]]
  image_dir = "{dirs / 'hoge'}"
  keep_tokens = 3
"""
    argv = ["--keep_tokens", "9", "--caption_prefix", "cli", "--caption_suffix", "cli", "--caption_tag_dropout_rate", "0.25",
            "--train_batch_size", "5", "--dataset_repeats", "4", "--resolution", "1024,768"]
    (dataset,) = blueprint_of(text, dirs, argv).datasets
    s = dataset.subsets[0].params
    assert s.keep_tokens == 3  # subset
    assert s.caption_prefix == "dataset"  # dataset
    assert s.caption_suffix == "general"  # general
    assert s.caption_tag_dropout_rate == 0.25  # command line
    assert s.num_repeats == 4  # --dataset_repeats is num_repeats
    assert s.token_warmup_min == 1 and s.caption_extension == ".caption"  # defaults (via argparse)
    assert dataset.params.batch_size == 5  # --train_batch_size is batch_size
    assert dataset.params.resolution == (512, 512)  # config beats --resolution


def test_json_config_gives_the_same_blueprint(dirs):
    toml_text = f"""
[general]
flip_aug = true
[[datasets]]
resolution = [1024, 768]
  [[datasets.subsets]]
  image_dir = "{dirs / 'hoge'}"
  num_repeats = 3
"""
    json_text = json.dumps(
        {"general": {"flip_aug": True}, "datasets": [{"resolution": [1024, 768], "subsets": [{"image_dir": str(dirs / "hoge"), "num_repeats": 3}]}]}
    )
    a = blueprint_of(toml_text, dirs, name="c.toml").datasets[0]
    b = blueprint_of(json_text, dirs, name="c.json").datasets[0]
    assert a.params == b.params and a.subsets[0].params == b.subsets[0].params


def test_unknown_key_names_file_path_and_suggestion(dirs):
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{dirs / 'hoge'}"
  [[datasets.subsets]]
  image_dir = "{dirs / 'fuga'}"
  shuffle_captions = true
"""
    message = error_of(text, dirs)
    assert "config.toml: datasets[0].subsets[1].shuffle_captions: unknown key 'shuffle_captions'" in message
    assert "did you mean 'shuffle_caption'?" in message


def test_misplaced_key_says_where_it_belongs(dirs):
    # upstream's docs put validation_split in a subset; the schema only allows it higher up
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{dirs / 'hoge'}"
  validation_split = 0.1
"""
    message = error_of(text, dirs)
    assert "datasets[0].subsets[0].validation_split" in message
    assert "can only be set in [general] or [[datasets]]" in message
    assert "general.image_dir" in error_of('[general]\nimage_dir = "x"\n', dirs)
    assert "command-line option; the config name is 'batch_size'" in error_of("[general]\ntrain_batch_size = 2\n", dirs)
    assert "unknown top-level key 'settings'" in error_of("[settings]\na = 1\n", dirs)


@pytest.mark.parametrize(
    "line, path, expected",
    [
        ('num_repeats = "10"', "datasets[0].subsets[0].num_repeats", "expected an integer, got '10'"),
        ("flip_aug = 1", "datasets[0].subsets[0].flip_aug", "expected true or false, got 1"),
        ("caption_dropout_rate = 1.5", "datasets[0].subsets[0].caption_dropout_rate", "expected a value between 0 and 1"),
        ('resize_interpolation = "sinc"', "datasets[0].subsets[0].resize_interpolation", "expected one of lanczos"),
    ],
)
def test_wrong_type_names_path(dirs, line, path, expected):
    text = f'[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "{dirs / "hoge"}"\n  {line}\n'
    message = error_of(text, dirs)
    assert f"config.toml: {path}: " in message and expected in message


def test_wrong_resolution_type(dirs):
    message = error_of(f'[general]\nresolution = [512]\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{dirs / "hoge"}"\n', dirs)
    assert "general.resolution: expected an integer or [width, height]" in message


def test_missing_image_dir(dirs):
    message = error_of('[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  class_tokens = "sks"\n', dirs)
    assert "config.toml: datasets[0].subsets[0].image_dir: required key not set" in message


def test_mixed_subset_kinds(dirs):
    text = f"""
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "{dirs / 'hoge'}"
  [[datasets.subsets]]
  metadata_file = "{dirs / 'piyo' / 'piyo_md.json'}"
"""
    message = error_of(text, dirs)
    assert "config.toml: datasets[0]: DreamBooth subsets" in message and "cannot be mixed" in message
    assert "subsets [0]" in message and "subsets [1]" in message


def test_missing_files(dirs):
    assert "nope.toml: dataset config file not found" in str(_raises(lambda: config_util.load_user_config(dirs / "nope.toml")))
    assert "unsupported dataset config format '.yaml'" in str(_raises(lambda: config_util.load_user_config(_touch(dirs / "c.yaml"))))
    message = error_of(f'[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "{dirs / "missing"}"\n', dirs)
    assert "datasets[0].subsets[0].image_dir: image folder not found" in message
    message = error_of(f'[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  metadata_file = "{dirs / "md.json"}"\n', dirs)
    assert "datasets[0].subsets[0].metadata_file: metadata file not found" in message
    assert "cannot parse TOML" in error_of("[general\n", dirs)


def test_dataset_level_checks(dirs):
    subset = f'  [[datasets.subsets]]\n  image_dir = "{dirs / "hoge"}"\n'
    assert "datasets[0].resolution: resolution is required" in error_of("[[datasets]]\n" + subset, dirs)
    message = error_of("[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 768\n" + subset, dirs)
    assert "datasets[0]: min_bucket_reso (768) must be equal or less than the resolution" in message
    # min/max are rounded to the step, as upstream
    (dataset,) = blueprint_of("[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 300\nmax_bucket_reso = 1000\n" + subset, dirs).datasets
    assert (dataset.params.min_bucket_reso, dataset.params.max_bucket_reso) == (256, 1024)
    assert "face_crop_aug_range is not supported" in error_of("[[datasets]]\nresolution = 512\nface_crop_aug_range = [2.0, 4.0]\n" + subset, dirs)
    message = error_of('[general]\nclass_tokens = "x"\n[[datasets]]\nresolution = 512\nclass_tokens = "y"\n'
                       f'  [[datasets.subsets]]\n  metadata_file = "{dirs / "piyo" / "piyo_md.json"}"\n', dirs)
    assert "datasets[0].class_tokens" in message and "DreamBooth option" in message


def test_bad_command_line_values(dirs):
    subset = f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{dirs / "hoge"}"\n'
    assert "--resolution: expected '1024' or '1024,1024', got '10x10'" in error_of(subset, dirs, ["--resolution", "10x10"])


def test_folder_convention_without_config(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    for d in (train / "10_sks dog", train / "2_sks_cat", train / "notes", reg / "1_dog"):
        d.mkdir(parents=True)
    (train / "3_file.txt").write_text("a file, not a folder")
    args = parse_args(["--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "512"])
    user_config, source = config_util.user_config_from_args(args)
    assert source == "command line"
    assert user_config["datasets"][0]["subsets"] == [
        {"image_dir": str(train / "10_sks dog"), "num_repeats": 10, "is_reg": False, "class_tokens": "sks dog"},
        {"image_dir": str(train / "2_sks_cat"), "num_repeats": 2, "is_reg": False, "class_tokens": "sks_cat"},
        {"image_dir": str(reg / "1_dog"), "num_repeats": 1, "is_reg": True, "class_tokens": "dog"},
    ]
    (dataset,) = config_util.generate_blueprint(user_config, args, source).datasets
    assert dataset.params.resolution == (512, 512)

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    message = str(_raises(lambda: config_util.user_config_from_args(parse_args(["--train_data_dir", str(empty)]))))
    assert "--train_data_dir: no data found" in message and "'<repeats>_<class tokens>'" in message


def test_add_dataset_arguments_defaults_match_upstream():
    args = parse_args([])
    expected = {
        "train_data_dir": None, "reg_data_dir": None, "in_json": None, "dataset_repeats": 1, "resolution": None,
        "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
        "bucket_no_upscale": False, "resize_interpolation": None, "caption_extension": ".caption",
        "caption_extention": None, "shuffle_caption": False, "keep_tokens": 0, "caption_separator": ",",
        "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
        "caption_suffix": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
        "caption_tag_dropout_rate": 0.0, "token_warmup_min": 1, "token_warmup_step": 0.0, "flip_aug": False,
        "color_aug": False, "random_crop": False, "face_crop_aug_range": None, "cache_latents": False,
        "cache_latents_to_disk": False, "vae_batch_size": 1, "skip_cache_check": False, "cache_info": False,
        "alpha_mask": False, "debug_dataset": False, "dataset_class": None, "dataset_config": None,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    with pytest.raises(SystemExit):
        parse_args(["--resize_interpolation", "box"])  # config-only upstream
    args = parse_args(["--caption_extention", ".txt", "--resolution", "1024"])
    config_util.prepare_dataset_args(args)
    assert (args.caption_extension, args.resolution) == (".txt", (1024, 1024))


def _raises(fn):
    with pytest.raises(ConfigError) as info:
        fn()
    return info.value


def _touch(path):
    path.write_text("")
    return path


def test_no_images_at_all_is_an_error(dirs):
    text = f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{dirs / "hoge"}"\n'
    blueprint = blueprint_of(text, dirs)
    message = str(_raises(lambda: config_util.generate_dataset_group_by_blueprint(blueprint, 0)))
    assert "no training images found in" in message and "hoge" in message
