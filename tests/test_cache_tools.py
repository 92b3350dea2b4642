"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py on the tiny model: the files they write are the
ones the trainer would write and accept."""

import os
import re
import shutil

import mindspore as ms
import numpy as np
import pytest

import sdxl_train_network
import train_network
from library import caching, config_util, sdxl_train_util
from library.bucketing import trim_and_resize_if_required
from library.image_loading import load_image, to_chw_float
from tools import cache_latents, cache_text_encoder_outputs
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from train_helpers import write_training_workspace

NUM_IMAGES = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_tools")
    ckpt, data_dir = write_training_workspace(root, num_images=NUM_IMAGES, num_repeats=1)
    return ckpt, data_dir


@pytest.fixture
def data_dir(workspace, tmp_path):
    """A fresh copy of the images for each test (the caches are written beside them)."""
    return shutil.copytree(workspace[1], tmp_path / "data")


def image_paths(data_dir):
    folder = os.path.join(data_dir, "1_sks")
    return [os.path.join(folder, f"img{i}.png") for i in range(NUM_IMAGES)]


def dataset_flags(ckpt, data_dir):
    return ["--pretrained_model_name_or_path", ckpt, "--train_data_dir", str(data_dir), "--resolution", "64",
            "--caption_extension", ".txt", "--seed", "3"]


def trainer_group(argv):
    """(args, trainer, group, tokenizer): the dataset group as NetworkTrainer.train builds it from these flags."""
    args = sdxl_train_network.setup_parser().parse_args(argv)
    config_util.prepare_dataset_args(args)
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    tokenize_strategy = trainer.load_tokenizer(args)
    group, _ = config_util.build_dataset_groups(args, tokenize_strategy)
    return args, trainer, group, tokenize_strategy


def load_npz(path):
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


class NoEncoding:
    """Stands in for a model that must not run: the trainer found every cache valid."""

    def encode(self, *_):
        raise AssertionError("the trainer re-encoded an image although its cache was valid")

    def __call__(self, *_):
        raise AssertionError("the trainer re-encoded a caption although its cache was valid")


def test_cache_latents_tool_writes_what_the_trainer_computes_and_accepts(workspace, data_dir, monkeypatch):
    ckpt, _ = workspace
    flags = dataset_flags(ckpt, data_dir) + ["--flip_aug"]
    cache_latents.main(flags + ["--sdxl", "--vae_batch_size", "2"])

    paths = [p[:-4] + "_0064x0064_sdxl.npz" for p in image_paths(data_dir)]
    files = [load_npz(p) for p in paths]
    for npz in files:
        assert sorted(npz) == ["crop_ltrb", "latents", "latents_flipped", "original_size"]
        assert npz["latents"].shape == npz["latents_flipped"].shape == (4, 8, 8)  # bucket 64x64 -> 8x8 latents
        assert npz["latents"].dtype == npz["latents_flipped"].dtype == np.float32
        assert npz["original_size"].dtype == np.int64 and npz["original_size"].tolist() == [64, 64]
        assert npz["crop_ltrb"].dtype == np.float64 and npz["crop_ltrb"].tolist() == [0, 0, 64, 64]

    # the files hold posterior samples: (latents - mean) / std of the VAE's posterior, computed here directly with
    # the library functions, must look like N(0, 1). Tolerances: 4 x 256 draws pooled, so the sample mean has
    # sigma 1/32 and the sample std about 1/45; 0.15 and 0.12 are over 4.5 sigma. (The tiny VAE's std is 0.8-1.6:
    # the samples are not simply the mean.)
    args = sdxl_train_network.setup_parser().parse_args(flags)
    _, _, vae, _, _ = sdxl_train_util.load_target_model(args)
    means, zs = [], []
    for path, npz in zip(image_paths(data_dir), files):
        image, _, _ = trim_and_resize_if_required(load_image(path), (64, 64), (64, 64), False, None)
        pixels = to_chw_float(image)[None]
        for key, batch in (("latents", pixels), ("latents_flipped", pixels[:, :, :, ::-1].copy())):
            mean, logvar = (t.asnumpy()[0] for t in vae.encode(ms.Tensor(batch)))
            means.append(mean)
            zs.append((npz[key] - mean) / np.exp(0.5 * np.clip(logvar, -30, 20)))
    zs = np.stack(zs)
    assert abs(zs.mean()) < 0.15 and abs(zs.std() - 1) < 0.12, (zs.mean(), zs.std())

    # a training run accepts them: the trainer's validity check passes, its caching step encodes nothing, and its
    # batches are read from the files
    args, trainer, group, _ = trainer_group(flags + ["--cache_latents_to_disk"])
    for _, info in group.image_infos():
        path = caching.latents_npz_path(info.absolute_path, info.image_size)
        assert path in paths
        assert caching.is_latents_npz_valid(path, info.bucket_reso, info.subset.flip_aug)
    trainer.cache_latents(args, NoEncoding(), group)
    batch, details = group.get_batch(0)
    npz = files[int(re.search(r"img(\d+)", details["image_key"][0]).group(1))]
    np.testing.assert_array_equal(batch[0][0], npz["latents_flipped" if details["flipped"][0] else "latents"])

    # a second run keeps the valid files (sampling is random: a rewrite would change them)
    cache_latents.main(flags + ["--sdxl", "--skip_existing"])
    for path, npz in zip(paths, files):
        for key, value in load_npz(path).items():
            np.testing.assert_array_equal(value, npz[key])

    # with the posterior mean in place of the sample, the tool's files equal the trainer's in-memory cache of the
    # same images, and the mean computed directly above
    monkeypatch.setattr(train_network, "sample_diagonal_gaussian", lambda mean, logvar: mean)
    for path in paths:
        os.remove(path)
    cache_latents.main(flags + ["--sdxl", "--vae_batch_size", "2"])
    args, trainer, group, _ = trainer_group(flags + ["--vae_batch_size", "2", "--cache_latents"])
    trainer.cache_latents(args, vae, group)
    for _, info in group.image_infos():
        npz = load_npz(caching.latents_npz_path(info.absolute_path, info.image_size))
        np.testing.assert_allclose(npz["latents"], info.latents, rtol=0, atol=1e-6)
        np.testing.assert_allclose(npz["latents_flipped"], info.latents_flipped, rtol=0, atol=1e-6)
        assert npz["original_size"].tolist() == list(info.latents_original_size)
        assert npz["crop_ltrb"].tolist() == list(info.latents_crop_ltrb)
        k = int(re.search(r"img(\d+)", info.image_key).group(1))
        np.testing.assert_allclose(npz["latents"], means[2 * k], rtol=0, atol=1e-5)
        np.testing.assert_allclose(npz["latents_flipped"], means[2 * k + 1], rtol=0, atol=1e-5)


def test_cache_text_encoder_outputs_tool_writes_what_the_trainer_computes_and_accepts(workspace, data_dir, tmp_path):
    ckpt, _ = workspace
    # --config_file with the model and --max_token_length, --dataset_config with the data
    dataset_config = tmp_path / "data.toml"
    dataset_config.write_text(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n\n[[datasets]]\n'
        f'  [[datasets.subsets]]\n  image_dir = "{os.path.join(data_dir, "1_sks")}"\n  num_repeats = 1\n'
    )
    config_file = tmp_path / "train.toml"
    config_file.write_text(
        f'[model]\npretrained_model_name_or_path = "{ckpt}"\n\n[dataset]\nmax_token_length = 150\n'
        f'dataset_config = "{dataset_config}"\n'
    )
    cache_text_encoder_outputs.main(["--config_file", str(config_file), "--vae_batch_size", "2"])

    paths = [p[:-4] + "_te_outputs.npz" for p in image_paths(data_dir)]
    files = {p: load_npz(p) for p in paths}
    for npz in files.values():
        assert sorted(npz) == ["hidden_state1", "hidden_state2", "pool2"]
        # max_token_length 150: 2 windows of 75 tokens + BOS/EOS = 152 positions; the tiny encoders are 32 wide
        assert npz["hidden_state1"].shape == (152, 32) and npz["hidden_state2"].shape == (152, 32)
        assert npz["pool2"].shape == (32,)
        assert all(v.dtype == np.float32 for v in npz.values())
    assert not np.allclose(files[paths[0]]["pool2"], files[paths[1]]["pool2"])  # two captions, two encodings

    argv = ["--pretrained_model_name_or_path", ckpt, "--dataset_config", str(dataset_config),
            "--max_token_length", "150", "--vae_batch_size", "2"]
    # the trainer's own in-memory cache of the same captions
    args, trainer, group, tokenize_strategy = trainer_group(argv + ["--cache_text_encoder_outputs"])
    te1, te2, _, _, _ = sdxl_train_util.load_target_model(args)
    trainer.cache_text_encoder_outputs(args, (te1, te2), group, tokenize_strategy)
    for _, info in group.image_infos():
        npz = files[caching.text_encoder_outputs_npz_path(info.absolute_path)]
        for key, value in zip(("hidden_state1", "hidden_state2", "pool2"), info.text_encoder_outputs):
            np.testing.assert_allclose(npz[key], value, rtol=0, atol=1e-6, err_msg=key)

    # a training run accepts them; with another max_token_length it would rebuild them
    args, trainer, group, tokenize_strategy = trainer_group(argv + ["--cache_text_encoder_outputs_to_disk"])
    for _, info in group.image_infos():
        path = caching.text_encoder_outputs_npz_path(info.absolute_path)
        assert caching.is_text_encoder_outputs_npz_valid(path, 152)
        assert not caching.is_text_encoder_outputs_npz_valid(path, 77)
    trainer.cache_text_encoder_outputs(args, (NoEncoding(), NoEncoding()), group, tokenize_strategy)
    group.text_encoder_outputs_cached = True
    batch, details = group.get_batch(0)
    npz = files[paths[int(re.search(r"img(\d+)", details["image_key"][0]).group(1))]]
    np.testing.assert_array_equal(batch[3][0], npz["pool2"])


@pytest.mark.parametrize("tool, extra, message", [
    (cache_latents, ["--sdxl", "--train_data_dir", "{tmp}/missing"], "missing"),
    (cache_latents, ["--sdxl", "--flux"], "--flux"),
    (cache_latents, ["--sdxl", "--color_aug"], "color_aug"),
    (cache_latents, ["--sdxl", "--resolution", "64,x"], "--resolution"),
    (cache_latents, [], "an SDXL checkpoint; pass --sdxl (without it the tool caches for SD 1.x/2.x, as upstream)"),
    (cache_text_encoder_outputs, ["--shuffle_caption"], "shuffle_caption"),
    (cache_text_encoder_outputs, ["--weighted_captions"], "--weighted_captions"),
    (cache_text_encoder_outputs, ["--pretrained_model_name_or_path", "{tmp}"], "a folder without model_index.json"),
    (cache_text_encoder_outputs, ["--pretrained_model_name_or_path", "{tmp}/none.safetensors"], "file not found"),
])
def test_bad_inputs_are_one_line_errors(workspace, data_dir, tmp_path, tool, extra, message):
    argv = dataset_flags(workspace[0], data_dir) + [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not any(name.endswith(".npz") for name in os.listdir(os.path.join(data_dir, "1_sks")))


def test_cache_latents_tool_caches_sd_latents_without_sdxl(data_dir, tmp_path, monkeypatch):
    """Without --sdxl the tool is SD 1.x's, as upstream: `_sd.npz` files of the SD VAE's posterior mean (sampling
    replaced by the mean), which the SD trainer accepts and its in-memory cache equals."""
    ckpt = str(tmp_path / "tiny_sd1.safetensors")
    make_tiny_checkpoint(ckpt, "tiny_sd1", seed=5)
    flags = dataset_flags(ckpt, data_dir)
    monkeypatch.setattr(train_network, "sample_diagonal_gaussian", lambda mean, logvar: mean)
    cache_latents.main(flags)
    paths = [p[:-4] + "_0064x0064_sd.npz" for p in image_paths(data_dir)]
    assert all(os.path.exists(p) for p in paths)
    assert not any(name.endswith("_sdxl.npz") for name in os.listdir(os.path.join(data_dir, "1_sks")))

    args = train_network.setup_parser().parse_args(flags + ["--cache_latents"])
    config_util.prepare_dataset_args(args)
    trainer = train_network.NetworkTrainer()
    group, _ = config_util.build_dataset_groups(args, trainer.load_tokenizer(args))
    _, vae, _ = train_network.load_sd_models(args)
    trainer.cache_latents(args, vae, group)
    for _, info in group.image_infos():
        path = caching.latents_npz_path(info.absolute_path, info.image_size, caching.SD_LATENTS_NPZ_SUFFIX)
        assert path in paths and caching.is_latents_npz_valid(path, info.bucket_reso, info.subset.flip_aug)
        np.testing.assert_allclose(load_npz(path)["latents"], info.latents, rtol=0, atol=1e-6)
