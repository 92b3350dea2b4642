"""Diffusers-format SDXL folders: the same weights as the single file, fp16 variants, shards, strict errors naming the
file and the key or field, the full-size UNet name mapping, `--vae` folders and the two entry points."""

import argparse
import json
import os
import re
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters
from PIL import Image
from safetensors.numpy import load_file, save_file

import sdxl_minimal_inference as smi
from library import diffusers_loading, sdxl_model_util, sdxl_train_util
from library.autoencoder_kl import AutoencoderKL
from library.diffusers_loading import UnetKeyMap
from library.sdxl_model_util import CheckpointError
from library.sdxl_original_unet import SdxlUNet2DConditionModel
from library.sdxl_tokenize import SdxlTokenizeStrategy
from tests.diffusers_folder import write_diffusers_folder
from tools.make_tiny_checkpoint import make_tiny_checkpoint

# Real diffusers SDXL base UNet keys (stabilityai/stable-diffusion-xl-base-1.0, unet/) with their single-file SGM
# names (`model.diffusion_model.` stripped), written out by hand from the two files' layouts.
SDXL_DIFFUSERS_TO_SGM = {
    "conv_in.weight": "input_blocks.0.0.weight",
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
    "down_blocks.0.resnets.1.time_emb_proj.weight": "input_blocks.2.0.emb_layers.1.weight",
    "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
    "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
    "down_blocks.1.attentions.0.proj_in.weight": "input_blocks.4.1.proj_in.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight":
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj.weight":
        "input_blocks.5.1.transformer_blocks.1.ff.net.0.proj.weight",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight":
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
    "mid_block.resnets.0.time_emb_proj.weight": "middle_block.0.emb_layers.1.weight",
    "mid_block.attentions.0.transformer_blocks.9.norm3.bias": "middle_block.1.transformer_blocks.9.norm3.bias",
    "mid_block.resnets.1.conv2.weight": "middle_block.2.out_layers.3.weight",
    "up_blocks.0.resnets.2.conv_shortcut.weight": "output_blocks.2.0.skip_connection.weight",
    "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.weight":
        "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0.weight",
    "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
    "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
    "up_blocks.2.resnets.2.norm2.weight": "output_blocks.8.0.out_layers.0.weight",
    "conv_norm_out.weight": "out.0.weight",
    "conv_out.bias": "out.2.bias",
}
SDXL_UNET_KEY_COUNT = 1680  # tensors in SDXL base's unet/diffusion_pytorch_model.safetensors


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    make_tiny_checkpoint(str(path), seed=3)
    return str(path)


@pytest.fixture(scope="module")
def folder(ckpt, tmp_path_factory):
    return write_diffusers_folder(ckpt, str(tmp_path_factory.mktemp("diffusers") / "tiny_sdxl"))


@pytest.fixture(scope="module")
def single_file_models(ckpt):
    return sdxl_model_util.load_models_from_sdxl_checkpoint(ckpt)[:4]


def assert_same_weights(models, expected_models, cast=None):
    assert len(models) == len(expected_models)
    for model, expected in zip(models, expected_models):
        params = dict(model.parameters_and_names())
        expected_params = dict(expected.parameters_and_names())
        assert sorted(params) == sorted(expected_params), type(model).__name__
        for key, param in expected_params.items():
            want = param.asnumpy() if cast is None else param.asnumpy().astype(cast)
            np.testing.assert_array_equal(params[key].asnumpy(), want, err_msg=f"{type(model).__name__}: {key}")


def test_folder_loads_to_the_single_file_weights(folder, single_file_models):
    te1, te2, vae, unet, logit_scale, ckpt_info = diffusers_loading.load_models_from_diffusers_folder(folder)
    assert_same_weights((te1, te2, vae, unet), single_file_models)
    assert logit_scale is None and ckpt_info is None


def test_config_built_from_the_folder_is_the_tiny_config(folder):
    config = diffusers_loading.model_config_from_diffusers_folder(folder)
    tiny = sdxl_model_util.load_model_config("tiny_sdxl")
    assert {k: v for k, v in config.items() if k != "name"} == {k: v for k, v in tiny.items() if k != "name"}


def test_sharded_fp16_variant_loads_to_the_fp16_rounded_weights(ckpt, single_file_models, tmp_path):
    path = write_diffusers_folder(ckpt, str(tmp_path / "fp16"), variant="fp16", unet_shards=3)
    assert len([f for f in os.listdir(os.path.join(path, "unet")) if f.endswith(".safetensors")]) == 3
    models = diffusers_loading.load_models_from_diffusers_folder(path, dtype=ms.float16)[:4]
    assert {p.dtype for m in models for p in m.get_parameters()} == {ms.float16}
    assert_same_weights(models, single_file_models, cast=np.float16)


@pytest.mark.parametrize("present, prefer_fp16, chosen", [
    (["model.safetensors", "model.fp16.safetensors"], False, "model.safetensors"),
    (["model.safetensors", "model.fp16.safetensors"], True, "model.fp16.safetensors"),
    (["model.fp16.safetensors"], False, "model.fp16.safetensors"),
    (["model.safetensors"], True, "model.safetensors"),
])
def test_variant_choice(tmp_path, present, prefer_fp16, chosen):
    for name in present:
        (tmp_path / name).write_bytes(b"")
    assert diffusers_loading.weight_files(str(tmp_path), "model", prefer_fp16) == (
        str(tmp_path / chosen), [str(tmp_path / chosen)])


def edit_weights(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_json(path, edit):
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    edit(value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def pop(key):
    return lambda d: d.pop(key)


def put(key, value):
    return lambda d: d.__setitem__(key, value)


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
ZEROS = np.zeros((32, 32), np.float32)
# (file to edit, edit, file named in the error, expected message after the file's path)
BAD_FOLDERS = {
    "missing key": (UNET_WEIGHTS, pop("down_blocks.1.attentions.0.proj_in.weight"), UNET_WEIGHTS,
                    r": checkpoint does not match the model\n  missing keys \(1\): "
                    r"down_blocks\.1\.attentions\.0\.proj_in\.weight$"),
    "unexpected key": (UNET_WEIGHTS, put("down_blocks.0.attentions.0.proj_in.weight", ZEROS), UNET_WEIGHTS,
                       r": checkpoint does not match the model\n  unexpected keys \(1\): "
                       r"down_blocks\.0\.attentions\.0\.proj_in\.weight$"),
    "missing text encoder key": ("text_encoder_2/model.safetensors", pop("text_projection.weight"),
                                 "text_encoder_2/model.safetensors",
                                 r":.*\n  missing keys \(1\): text_projection\.weight$"),
    "unsupported config value": ("unet/config.json", put("use_linear_projection", False), "unet/config.json",
                                 r": use_linear_projection is False; only True is supported"),
    "config changing a shape": ("unet/config.json", put("cross_attention_dim", 48), UNET_WEIGHTS,
                                r": shape mismatch for 'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2"
                                r"\.to_k\.weight': checkpoint \(64, 64\), model \(64, 48\)"),
    "missing config field": ("text_encoder/config.json", pop("hidden_act"), "text_encoder/config.json",
                             r": missing field 'hidden_act'"),
    "up blocks not mirrored": ("unet/config.json", put("up_block_types", ["UpBlock2D"] * 3), "unet/config.json",
                               r": up_block_types .*: expected \['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', "
                               r"'UpBlock2D'\]"),
    "added tokens": ("text_encoder/config.json", put("vocab_size", 49410), "text_encoder/config.json",
                     r": vocab_size is 49410; the tokenizers here are SDXL's"),
    "another model's VAE": ("vae/config.json", put("scaling_factor", 0.18215), "vae/config.json",
                            r": scaling_factor is 0.18215; an SDXL VAE has 0.13025"),
    "SD 1.x pipeline": ("model_index.json", pop("text_encoder_2"), "model_index.json",
                        r": no 'text_encoder_2' component \(StableDiffusionXLPipeline\); only SDXL pipelines"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder_is_an_error_naming_the_file_and_key(folder, tmp_path, case):
    edited, edit, named, message = BAD_FOLDERS[case]
    copy = shutil.copytree(folder, str(tmp_path / "copy"))
    (edit_json if edited.endswith(".json") else edit_weights)(os.path.join(copy, edited), edit)
    with pytest.raises(CheckpointError) as e:
        diffusers_loading.load_models_from_diffusers_folder(copy)
    assert re.match(re.escape(os.path.join(copy, named)) + message, str(e.value)), str(e.value)


def test_bin_weights_are_refused_by_name(folder, tmp_path):
    copy = shutil.copytree(folder, str(tmp_path / "copy"))
    te2 = os.path.join(copy, "text_encoder_2")
    os.rename(os.path.join(te2, "model.safetensors"), os.path.join(te2, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(te2, "pytorch_model.bin")) +
                       r": \.bin weights \(torch pickles\) are not supported"):
        diffusers_loading.load_models_from_diffusers_folder(copy)


def test_sdxl_base_unet_names_map_one_to_one_both_ways():
    """Every parameter of the full-size SGM UNet (built without allocating) has one diffusers name and maps back,
    and the names agree with the hand-written list of real ones."""
    config = sdxl_model_util.load_model_config("sdxl_base")["unet"]
    with no_init_parameters():
        unet = SdxlUNet2DConditionModel(**config)
    sgm_names = [name for name, _ in unet.parameters_and_names()]
    key_map = UnetKeyMap(config)
    diffusers_names = [key_map.to_diffusers(name) for name in sgm_names]
    assert None not in diffusers_names
    assert len(set(diffusers_names)) == len(sgm_names) == SDXL_UNET_KEY_COUNT
    assert [key_map.to_sgm(name) for name in diffusers_names] == sgm_names
    for diffusers_name, sgm_name in SDXL_DIFFUSERS_TO_SGM.items():
        assert key_map.to_diffusers(sgm_name) == diffusers_name
        assert key_map.to_sgm(diffusers_name) == sgm_name
    # names of the other layout, or of no block, are no parameter names
    assert key_map.to_sgm("input_blocks.1.0.in_layers.0.weight") is None
    assert key_map.to_sgm("down_blocks.0.attentions.0.proj_in.weight") is None
    assert key_map.to_sgm("mid_block.resnets.0.nin_shortcut.weight") is None


@pytest.fixture(scope="module")
def shifted_vae_folder(folder, tmp_path_factory):
    """A diffusers VAE folder (config.json + weights) holding the tiny VAE's weights + 1."""
    vae_dir = shutil.copytree(os.path.join(folder, "vae"), str(tmp_path_factory.mktemp("vae") / "vae"))
    edit_weights(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"),
                 lambda tensors: tensors.update({k: v + 1 for k, v in tensors.items()}))
    return vae_dir


def test_trainer_loads_a_folder_with_a_vae_folder(folder, shifted_vae_folder, single_file_models):
    args = argparse.Namespace(pretrained_model_name_or_path=folder, vae=shifted_vae_folder)
    te1, te2, vae, unet, logit_scale = sdxl_train_util.load_target_model(args)
    assert_same_weights((te1, te2, unet), single_file_models[:2] + single_file_models[3:])
    single_file_vae = dict(single_file_models[2].parameters_and_names())
    for name, param in vae.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), single_file_vae[name].asnumpy() + 1, err_msg=name)


def test_vae_of_a_pipeline_folder(folder, single_file_models):
    vae = AutoencoderKL(**sdxl_model_util.load_model_config("tiny_sdxl")["vae"])  # random weights
    assert_same_weights((sdxl_train_util.load_vae(folder, vae),), single_file_models[2:3])


def test_vae_folder_that_does_not_fit_is_named(folder, tmp_path):
    vae_dir = shutil.copytree(os.path.join(folder, "vae"), str(tmp_path / "vae"))
    weights = os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")
    edit_weights(weights, pop("decoder.conv_out.bias"))
    vae = AutoencoderKL(**sdxl_model_util.load_model_config("tiny_sdxl")["vae"])
    with pytest.raises(CheckpointError, match=re.escape(weights) + r".*\n  missing keys \(1\): decoder.conv_out.bias"):
        sdxl_train_util.load_vae(vae_dir, vae)


def test_folder_without_model_index_is_named(tmp_path):
    args = argparse.Namespace(pretrained_model_name_or_path=str(tmp_path), vae=None)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}: a folder without model_index.json"):
        sdxl_train_util.load_target_model(args)


@pytest.fixture
def eager_context():
    previous = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    yield
    ms.set_context(mode=previous[0], pynative_synchronize=previous[1])


def test_inference_cli_takes_a_folder_and_draws_the_single_file_image(folder, single_file_models, tmp_path,
                                                                      eager_context):
    out = tmp_path / "out"
    smi.main(["--ckpt_path", folder, "--prompt", "a red cube", "--target_height", "64", "--target_width", "64",
              "--steps", "1", "--seed", "5", "--mode", "pynative", "--output_dir", str(out)])
    (png,) = os.listdir(out)
    pipeline = smi.SdxlPipeline.from_models(*single_file_models, SdxlTokenizeStrategy(None), graph_mode=False)
    expected = pipeline.generate(prompt="a red cube", target_size=(64, 64), steps=1, seed=5, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out / png)), expected)
    assert expected.std() > 0
