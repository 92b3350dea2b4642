"""SD 1.x / 2.x single-file checkpoints: key layout and counts, strict loading, save -> load -> save, --vae."""

import json
import re

import mindspore as ms
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from library import model_util, sdxl_model_util, sdxl_train_util
from library.original_unet_conversion import convert_unet_state_dict_to_sd
from library.sdxl_model_util import CheckpointError
from library.vae_conversion import convert_vae_state_dict
from tools.make_tiny_checkpoint import make_tiny_checkpoint


def read_all(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_variant(tensors, metadata, path, edit):
    tensors = dict(tensors)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_ckpts")
    paths = {}
    for seed, name in enumerate(("tiny_sd1", "tiny_sd2")):
        paths[name] = str(folder / f"{name}.safetensors")
        make_tiny_checkpoint(paths[name], name, seed=seed)
    return paths


def _stubs(cell):
    return {name: np.broadcast_to(np.zeros((), np.float16), p.shape) for name, p in cell.parameters_and_names()}


def _count(state_dict):
    return sum(int(np.prod(np.shape(v))) for v in state_dict.values())


@pytest.mark.parametrize("name", ["sd_v1", "sd_v2"])
def test_default_checkpoint_layout_parameter_counts(name):
    """The LDM key layout of the default configs, from zero-stride arrays (nothing allocated)."""
    config = sdxl_model_util.load_model_config(name)
    v2 = config["v2"]
    text_encoder, vae, unet = model_util.build_sd_models(config, allocate=False)
    unet_sd = convert_unet_state_dict_to_sd(v2, _stubs(unet), unet.config)
    te_sd = model_util.convert_text_encoder_state_dict_to_sd_v2(_stubs(text_encoder)) if v2 else _stubs(text_encoder)
    vae_sd = convert_vae_state_dict(_stubs(vae))
    assert _count(unet_sd) == (865_910_724 if v2 else 859_520_964)
    assert _count(vae_sd) == 83_653_863
    if v2:
        # OpenCLIP ViT-H text tower without its last resblock: width 1024, MLP 4096, 23 of 24 layers
        width, mlp, layers = 1024, 4096, 23
        per_layer = 4 * width + (3 * width * width + 3 * width) + (width * width + width) \
            + (width * mlp + mlp) + (mlp * width + width)
        assert _count(te_sd) == 49408 * width + 77 * width + layers * per_layer + 2 * width == 340_387_840
        assert te_sd["transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
        assert not any(k.startswith("transformer.resblocks.23.") for k in te_sd)
    else:
        assert _count(te_sd) == 123_060_480
    # LDM block numbering (SD 1.5 / 2.1 files), written out by hand
    projection = (320, 320) if v2 else (320, 320, 1, 1)
    expected = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": projection,
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024 if v2 else 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
        "middle_block.1.proj_out.bias": (1280,),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.3.1.norm.weight": (1280,),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": projection,
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: tuple(unet_sd[k].shape) if k in unet_sd else None for k in expected} == expected
    assert len(unet_sd) == 686
    assert max(int(m.group(1)) for m in map(re.compile(r"input_blocks\.(\d+)\.").match, unet_sd) if m) == 11
    assert max(int(m.group(1)) for m in map(re.compile(r"output_blocks\.(\d+)\.").match, unet_sd) if m) == 11


def test_tiny_checkpoints_have_the_ldm_layout(tiny_ckpts):
    for name, path in tiny_ckpts.items():
        tensors, metadata = read_all(path)
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in tensors}
        te = "cond_stage_model.model" if name == "tiny_sd2" else "cond_stage_model.transformer"
        assert prefixes == {"model.diffusion_model", te, "first_stage_model.encoder", "first_stage_model.decoder",
                            "first_stage_model.quant_conv", "first_stage_model.post_quant_conv"}
        assert json.loads(metadata[sdxl_model_util.CONFIG_METADATA_KEY]) == sdxl_model_util.load_model_config(name)
    sd2, _ = read_all(tiny_ckpts["tiny_sd2"])
    # without a source checkpoint, upstream's stand-ins: the dropped last resblock (3 of a 3-layer model) copies
    # resblock 2, a ones text_projection, logit_scale 1
    block = "cond_stage_model.model.transformer.resblocks."
    np.testing.assert_array_equal(sd2[block + "3.attn.in_proj_weight"], sd2[block + "2.attn.in_proj_weight"])
    np.testing.assert_array_equal(sd2["cond_stage_model.model.text_projection"], np.ones((32, 32), np.float32))
    assert float(sd2["cond_stage_model.model.logit_scale"]) == 1.0
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32)
    sd1, _ = read_all(tiny_ckpts["tiny_sd1"])
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2"])
def test_save_load_save_is_identical(tiny_ckpts, tmp_path, name):
    path = tiny_ckpts[name]
    v2 = name == "tiny_sd2"
    original, metadata = read_all(path)
    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, path)
    again = str(tmp_path / "again.safetensors")
    count = model_util.save_stable_diffusion_checkpoint(v2, again, text_encoder, unet, None, 1, 10, metadata, vae=vae)
    from_source = str(tmp_path / "from_source.safetensors")
    model_util.save_stable_diffusion_checkpoint(v2, from_source, text_encoder, unet, path, 1, 10)
    for saved in (again, from_source):
        tensors, saved_metadata = read_all(saved)
        assert sorted(tensors) == sorted(original) and count == len(original)
        for key, value in original.items():
            assert tensors[key].dtype == value.dtype, key
            np.testing.assert_array_equal(tensors[key], value, err_msg=key)
        # the architecture travels with the weights, also when only ckpt_path had it
        assert saved_metadata[sdxl_model_util.CONFIG_METADATA_KEY] == metadata[sdxl_model_util.CONFIG_METADATA_KEY]


def test_loaded_weights_land_in_the_right_parameters(tiny_ckpts):
    tensors, _ = read_all(tiny_ckpts["tiny_sd2"])
    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(
        True, tiny_ckpts["tiny_sd2"], dtype=ms.float16)
    diffusion = "model.diffusion_model."
    pairs = [
        (unet.up_blocks[0].upsamplers[0].conv.weight, tensors[diffusion + "output_blocks.2.1.conv.weight"]),
        (unet.up_blocks[1].upsamplers[0].conv.weight, tensors[diffusion + "output_blocks.5.2.conv.weight"]),
        (unet.down_blocks[1].downsamplers[0].conv.weight, tensors[diffusion + "input_blocks.6.0.op.weight"]),
        (unet.up_blocks[2].resnets[1].time_emb_proj.weight,
         tensors[diffusion + "output_blocks.7.0.emb_layers.1.weight"]),
        (unet.mid_block.resnets[1].conv2.bias, tensors[diffusion + "middle_block.2.out_layers.3.bias"]),
        (text_encoder.text_model.encoder.layers[2].self_attn.k_proj.weight,
         tensors["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"][32:64]),
        (vae.decoder.up_blocks[0].resnets[0].conv1.weight,
         tensors["first_stage_model.decoder.up.3.block.0.conv1.weight"]),
    ]
    for param, value in pairs:
        assert param.dtype == ms.float16
        np.testing.assert_array_equal(param.asnumpy(), value.astype(np.float16))
    assert len(text_encoder.text_model.encoder.layers) == 3  # resblock 3 was dropped, as upstream drops 23


def test_old_sd1_text_encoder_layout_loads(tiny_ckpts, tmp_path):
    """SD 1.x files from older transformers have no `text_model.` level; upstream renames them."""
    tensors, metadata = read_all(tiny_ckpts["tiny_sd1"])
    prefix = "cond_stage_model.transformer."

    def old_layout(t):
        for key in [k for k in t if k.startswith(prefix + "text_model.")]:
            t[prefix + key[len(prefix + "text_model."):]] = t.pop(key)
        t[prefix + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]

    path = write_variant(tensors, metadata, str(tmp_path / "old.safetensors"), old_layout)
    text_encoder, _, _ = model_util.load_models_from_stable_diffusion_checkpoint(False, path)
    np.testing.assert_array_equal(text_encoder.text_model.final_layer_norm.weight.asnumpy(),
                                  tensors[prefix + "text_model.final_layer_norm.weight"])


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.diffusion_model.output_blocks.4.1.proj_in.weight"),
     r"tiny_sd1.safetensors \(UNet, 'model.diffusion_model.\*'\): checkpoint does not match the model\n"
     r"  missing keys \(1\): model.diffusion_model.output_blocks.4.1.proj_in.weight$"),
    (lambda t: t.update({"cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.bias":
                         np.zeros(64, np.float32)}),
     r"tiny_sd1.safetensors \(text encoder, 'cond_stage_model.transformer.\*'\): checkpoint does not match the model\n"
     r"  unexpected keys \(1\): cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.bias$"),
    (lambda t: t.update({"model.diffusion_model.input_blocks.1.1.proj_in.weight": np.zeros((32, 32), np.float32)}),
     r"tiny_sd1.safetensors \(UNet, 'model.diffusion_model.\*'\): shape mismatch for "
     r"'model.diffusion_model.input_blocks.1.1.proj_in.weight': checkpoint \(32, 32\), model \(32, 32, 1, 1\)"),
    (lambda t: t.pop("first_stage_model.decoder.up.1.block.0.nin_shortcut.weight"),
     r"\(VAE, 'first_stage_model.\*'\): checkpoint does not match the model\n"
     r"  missing keys \(1\): first_stage_model.decoder.up.1.block.0.nin_shortcut.weight$"),
])
def test_strict_loading_names_the_key_and_the_file(tiny_ckpts, tmp_path, edit, message):
    tensors, metadata = read_all(tiny_ckpts["tiny_sd1"])
    path = write_variant(tensors, metadata, str(tmp_path / "tiny_sd1.safetensors"), edit)
    with pytest.raises(CheckpointError, match=message):
        model_util.load_models_from_stable_diffusion_checkpoint(False, path)


def test_wrong_family_is_named(tiny_ckpts):
    with pytest.raises(CheckpointError, match=r"the model config 'tiny_sd1' is SD 1.x, but --v2 was given"):
        model_util.load_models_from_stable_diffusion_checkpoint(True, tiny_ckpts["tiny_sd1"])
    config = sdxl_model_util.load_model_config("tiny_sd1")
    del config["v2"]
    with pytest.raises(CheckpointError, match=r"no 'cond_stage_model.model.\*' keys; it has an SD 1.x text encoder "
                                              r"\('cond_stage_model.transformer.\*'\): drop --v2"):
        model_util.load_models_from_stable_diffusion_checkpoint(True, tiny_ckpts["tiny_sd1"], config=config)


def test_saving_needs_a_vae_source(tiny_ckpts, tmp_path):
    text_encoder, _, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, tiny_ckpts["tiny_sd1"])
    with pytest.raises(ValueError, match="pass vae"):
        model_util.save_stable_diffusion_checkpoint(False, str(tmp_path / "x.safetensors"), text_encoder, unet,
                                                    None, 0, 0)
    with pytest.raises(ValueError, match=r"x.ckpt: only .safetensors checkpoints are written"):
        model_util.save_stable_diffusion_checkpoint(False, str(tmp_path / "x.ckpt"), text_encoder, unet,
                                                    tiny_ckpts["tiny_sd1"], 0, 0)


def test_vae_option_takes_an_sd_checkpoint_or_vae_file(tiny_ckpts, tmp_path):
    _, vae, _ = model_util.load_models_from_stable_diffusion_checkpoint(False, tiny_ckpts["tiny_sd1"])
    tensors, _ = read_all(tiny_ckpts["tiny_sd2"])
    vae_only = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae.safetensors"))
    expected = tensors["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0]
    for source in (tiny_ckpts["tiny_sd2"], str(tmp_path / "vae.safetensors")):
        vae.decoder.mid_block.attentions[0].to_q.weight.set_data(ms.Tensor(np.zeros_like(expected)))
        sdxl_train_util.load_vae(source, vae)
        np.testing.assert_array_equal(vae.decoder.mid_block.attentions[0].to_q.weight.asnumpy(), expected)


def test_vae_option_reads_only_the_vae_of_a_whole_checkpoint(tiny_ckpts, monkeypatch):
    _, vae, _ = model_util.load_models_from_stable_diffusion_checkpoint(False, tiny_ckpts["tiny_sd1"])
    read = []
    original_get = sdxl_model_util.CheckpointReader.get
    monkeypatch.setattr(sdxl_model_util.CheckpointReader, "get",
                        lambda reader, key: read.append(key) or original_get(reader, key))
    sdxl_train_util.load_vae(tiny_ckpts["tiny_sd2"], vae)
    tensors, _ = read_all(tiny_ckpts["tiny_sd2"])
    assert sorted(read) == sorted(k for k in tensors if k.startswith("first_stage_model."))
