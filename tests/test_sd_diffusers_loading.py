"""Diffusers-format SD 1.x / 2.x folders (StableDiffusionPipeline): the same weights as the single file, the config
read back, strict errors naming the file and the field, and the trainer's and inference's `--vae` / folder paths."""

import argparse
import os
import re
import shutil

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import sd_minimal_inference
import train_network
from library import diffusers_loading, model_util, sdxl_model_util
from library.sd_tokenize import SdTokenizeStrategy
from library.sdxl_model_util import CheckpointError
from tests.diffusers_folder import write_diffusers_folder, write_sd_diffusers_folder
from tests.test_diffusers_loading import assert_same_weights, edit_json
from tools.make_tiny_checkpoint import make_tiny_checkpoint

FAMILIES = {"tiny_sd1": False, "tiny_sd2": True}  # config -> v2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_ckpt")
    paths = {}
    for name in FAMILIES:
        paths[name] = str(root / f"{name}.safetensors")
        make_tiny_checkpoint(paths[name], name, seed=4)
    return paths


@pytest.fixture(scope="module")
def folders(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_diffusers")
    return {name: write_sd_diffusers_folder(checkpoints[name], str(root / name), v2) for name, v2 in FAMILIES.items()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_folder_loads_to_the_single_file_weights_and_config(checkpoints, folders, name):
    v2 = FAMILIES[name]
    models = diffusers_loading.load_sd_models_from_diffusers_folder(folders[name], v2)
    assert_same_weights(models, model_util.load_models_from_stable_diffusion_checkpoint(v2, checkpoints[name]))
    config = diffusers_loading.sd_model_config_from_diffusers_folder(folders[name], v2)
    tiny = sdxl_model_util.load_model_config(name)
    assert {k: v for k, v in config.items() if k != "name"} == {k: v for k, v in tiny.items() if k != "name"}


def test_fp16_loads_every_weight_in_fp16(folders):
    models = diffusers_loading.load_sd_models_from_diffusers_folder(folders["tiny_sd1"], False, dtype=ms.float16)
    assert {p.dtype for m in models for p in m.get_parameters()} == {ms.float16}


def put(key, value):
    return lambda d: d.__setitem__(key, value)


# (config file to edit, edit, expected message after the file's path)
BAD_CONFIGS = {
    "SD 2.x folder without --v2": ("text_encoder/config.json", put("hidden_act", "gelu"),
                                   r": hidden_act is gelu, an SD 2.x text encoder: add --v2$"),
    "another model's VAE": ("vae/config.json", put("scaling_factor", 0.13025),
                            r": scaling_factor is 0.13025; an SD 1.x/2.x VAE has 0.18215"),
    "attention in every level": ("unet/config.json", put("down_block_types", ["CrossAttnDownBlock2D"] * 3),
                                 r": down_block_types .*: expected \['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', "
                                 r"'DownBlock2D'\] \(SD 1.x/2.x's layout\)"),
    "an SDXL UNet": ("unet/config.json", put("addition_embed_type", "text_time"),
                     r": addition_embed_type is 'text_time'; only None is supported"),
    "added tokens": ("text_encoder/config.json", put("vocab_size", 49410),
                     r": vocab_size is 49410; the tokenizer here has 49408 tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_folder_is_an_error_naming_the_file(folders, tmp_path, case):
    edited, edit, message = BAD_CONFIGS[case]
    copy = shutil.copytree(folders["tiny_sd1"], str(tmp_path / "copy"))
    edit_json(os.path.join(copy, edited), edit)
    with pytest.raises(CheckpointError) as e:
        diffusers_loading.load_sd_models_from_diffusers_folder(copy, False)
    assert re.match(re.escape(os.path.join(copy, edited)) + message, str(e.value)), str(e.value)


def test_sdxl_folder_is_refused_by_the_sd_loader(tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    make_tiny_checkpoint(ckpt, seed=3)
    folder = write_diffusers_folder(ckpt, str(tmp_path / "sdxl"))
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(folder, "model_index.json")) +
                       ": an SDXL pipeline .*: use the sdxl_\\* scripts"):
        diffusers_loading.load_sd_models_from_diffusers_folder(folder, False)


def test_missing_weight_is_named(folders, tmp_path):
    copy = shutil.copytree(folders["tiny_sd1"], str(tmp_path / "copy"))
    weights = os.path.join(copy, "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    tensors.pop("down_blocks.0.attentions.0.proj_in.weight")
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=re.escape(weights) + r".*\n  missing keys \(1\): "
                       r"down_blocks\.0\.attentions\.0\.proj_in\.weight"):
        diffusers_loading.load_sd_models_from_diffusers_folder(copy, False)


def test_trainer_loads_a_folder_with_a_vae_folder(checkpoints, folders, tmp_path):
    vae_dir = shutil.copytree(os.path.join(folders["tiny_sd2"], "vae"), str(tmp_path / "vae"))
    vae_weights = os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")
    save_file({k: v + 1 for k, v in load_file(vae_weights).items()}, vae_weights)
    args = argparse.Namespace(pretrained_model_name_or_path=folders["tiny_sd2"], vae=vae_dir, v2=True)
    text_encoder, vae, unet = train_network.load_sd_models(args)
    expected = model_util.load_models_from_stable_diffusion_checkpoint(True, checkpoints["tiny_sd2"])
    assert_same_weights((text_encoder, unet), (expected[0], expected[2]))
    expected_vae = dict(expected[1].parameters_and_names())
    for name, param in vae.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), expected_vae[name].asnumpy() + 1, err_msg=name)


@pytest.fixture
def eager_context():
    previous = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    yield
    ms.set_context(mode=previous[0], pynative_synchronize=previous[1])


def test_inference_cli_takes_a_folder_and_draws_the_single_file_image(checkpoints, folders, tmp_path, eager_context):
    out = tmp_path / "out"
    sd_minimal_inference.main(["--ckpt_path", folders["tiny_sd1"], "--prompt", "a red cube", "--target_height", "64",
                               "--target_width", "64", "--steps", "1", "--seed", "5", "--mode", "pynative",
                               "--output_dir", str(out)])
    (png,) = os.listdir(out)
    models = model_util.load_models_from_stable_diffusion_checkpoint(False, checkpoints["tiny_sd1"])
    pipeline = sd_minimal_inference.SdPipeline.from_models(*models, SdTokenizeStrategy(False, None, None),
                                                           graph_mode=False)
    expected = pipeline.generate(prompt="a red cube", target_size=(64, 64), steps=1, seed=5, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out / png)), expected)
    assert expected.std() > 0
