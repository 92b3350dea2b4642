"""Single-file SDXL checkpoints: round trip, strictness, and the full-size key layout."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from library import sdxl_model_util
from library.sdxl_model_util import CheckpointError
from tools.make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    make_tiny_checkpoint(str(path), seed=3)
    return str(path)


def read_all(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_save_load_save_round_trip_is_identical(tiny_ckpt, tmp_path):
    original, metadata = read_all(tiny_ckpt)
    te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(tiny_ckpt)
    resaved = tmp_path / "resaved.safetensors"
    sdxl_model_util.save_stable_diffusion_checkpoint(str(resaved), te1, te2, unet, vae, logit_scale, metadata)
    again, _ = read_all(str(resaved))
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        assert again[key].dtype == value.dtype, key
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    assert not (tmp_path / "resaved.safetensors.tmp").exists()


def test_loaded_weights_are_the_file_values(tiny_ckpt):
    tensors, _ = read_all(tiny_ckpt)
    te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(tiny_ckpt)
    params = dict(unet.parameters_and_names())
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    np.testing.assert_array_equal(params[key].asnumpy(), tensors["model.diffusion_model." + key])
    # TE2 q is the first third of OpenCLIP's fused in_proj
    in_proj = tensors["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    q = dict(te2.parameters_and_names())["text_model.encoder.layers.1.self_attn.q_proj.weight"].asnumpy()
    np.testing.assert_array_equal(q, in_proj[: in_proj.shape[0] // 3])
    assert logit_scale == pytest.approx(float(tensors["conditioner.embedders.1.model.logit_scale"]))


def write_variant(src, dst, edit):
    tensors, metadata = read_all(src)
    edit(tensors)
    save_file(tensors, dst, metadata=metadata)
    return dst


def test_renamed_key_is_named_in_the_error(tiny_ckpt, tmp_path):
    key = "model.diffusion_model.middle_block.1.proj_in.weight"

    def rename(t):
        t["model.diffusion_model.middle_block.1.proj_inn.weight"] = t.pop(key)

    path = write_variant(tiny_ckpt, str(tmp_path / "renamed.safetensors"), rename)
    with pytest.raises(CheckpointError) as e:
        sdxl_model_util.load_models_from_sdxl_checkpoint(path)
    message = str(e.value)
    assert "missing keys (1): middle_block.1.proj_in.weight" in message
    assert "unexpected keys (1): middle_block.1.proj_inn.weight" in message
    assert "UNet" in message and path in message


def test_missing_key_is_named_in_the_error(tiny_ckpt, tmp_path):
    path = write_variant(
        tiny_ckpt, str(tmp_path / "missing.safetensors"),
        lambda t: t.pop("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"),
    )
    with pytest.raises(CheckpointError, match=r"text encoder 1.*\n  missing keys \(1\): text_model.final_layer_norm.bias"):
        sdxl_model_util.load_models_from_sdxl_checkpoint(path)


def test_misshaped_key_names_both_shapes(tiny_ckpt, tmp_path):
    key = "first_stage_model.encoder.conv_in.weight"

    def reshape(t):
        t[key] = np.zeros((7,) + t[key].shape[1:], t[key].dtype)

    path = write_variant(tiny_ckpt, str(tmp_path / "shape.safetensors"), reshape)
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'encoder.conv_in.weight': checkpoint \(7, 3, 3, 3\), model \(32, 3, 3, 3\)"):
        sdxl_model_util.load_models_from_sdxl_checkpoint(path)


def test_missing_file_and_non_sdxl_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sdxl_model_util.load_models_from_sdxl_checkpoint(str(tmp_path / "nope.safetensors"))
    other = tmp_path / "other.safetensors"
    save_file({"lora_unet_x.alpha": np.ones((), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="no 'model.diffusion_model.\\*' keys"):
        sdxl_model_util.load_models_from_sdxl_checkpoint(str(other))


def test_keys_outside_the_models_are_ignored(tiny_ckpt, tmp_path):
    def add(t):
        t["denoiser.sigmas"] = np.ones(4, np.float32)

    path = write_variant(tiny_ckpt, str(tmp_path / "extra.safetensors"), add)
    te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(path)
    assert unet is not None


def test_config_comes_from_metadata(tiny_ckpt):
    _, metadata = read_all(tiny_ckpt)
    assert json.loads(metadata[sdxl_model_util.CONFIG_METADATA_KEY]) == sdxl_model_util.load_model_config("tiny_sdxl")


def test_sdxl_base_checkpoint_layout_parameter_counts():
    """The SGM key layout of the default config, built from zero-stride arrays (nothing allocated), holds exactly
    SDXL base 1.0's parameter counts per model prefix."""
    config = sdxl_model_util.load_model_config("sdxl_base")
    te1, te2, vae, unet = sdxl_model_util.build_models(config, allocate=False)

    def shapes(cell):
        return {name: np.broadcast_to(np.zeros((), np.float16), p.shape) for name, p in cell.parameters_and_names()}

    from library.model_util import convert_vae_state_dict
    from library.openclip_conversion import convert_text_encoder_2_state_dict_to_sdxl

    parts = {
        sdxl_model_util.UNET_PREFIX: shapes(unet),
        sdxl_model_util.TE1_PREFIX: shapes(te1),
        sdxl_model_util.TE2_PREFIX: convert_text_encoder_2_state_dict_to_sdxl(shapes(te2), 2.0),
        sdxl_model_util.VAE_PREFIX: convert_vae_state_dict(shapes(vae)),
    }
    counts = {prefix: sum(int(np.prod(np.shape(v))) for v in sd.values()) for prefix, sd in parts.items()}
    assert counts[sdxl_model_util.UNET_PREFIX] == 2_567_463_684
    assert counts[sdxl_model_util.TE1_PREFIX] == 123_060_480
    assert counts[sdxl_model_util.TE2_PREFIX] == 694_659_840 + 1  # + OpenCLIP's logit_scale
    assert counts[sdxl_model_util.VAE_PREFIX] == 83_653_863
    te2_keys = parts[sdxl_model_util.TE2_PREFIX]
    assert te2_keys["transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert te2_keys["text_projection"].shape == (1280, 1280)
    assert te2_keys["positional_embedding"].shape == (77, 1280)
    assert len([k for k in te2_keys if k.startswith("transformer.resblocks.") and k.endswith("ln_1.weight")]) == 32
