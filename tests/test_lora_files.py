"""LoRA files: Kohya's keys and layouts, hashes, save/load, torch-written files, merging (PyNative, tiny models)."""

import hashlib
import json
import os
import struct

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from mindspore import Tensor

from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.sdxl_original_unet import SdxlUNet2DConditionModel
from networks import check_lora_weights, lora, lora_io

TINY = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_sdxl.json")))
MERGE_ATOL = 1e-5  # fp32: merged and unmerged differ only in summation order


@pytest.fixture(scope="module", autouse=True)
def pynative():
    old_mode, old_sync = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    yield
    ms.set_context(mode=old_mode, pynative_synchronize=old_sync)


def build_models(seed=0):
    """Tiny (te1, te2, unet) with weights drawn from `seed`, so two calls give identical models."""
    models = (CLIPTextModel(**TINY["text_encoder_1"]), CLIPTextModelWithProjection(**TINY["text_encoder_2"]),
              SdxlUNet2DConditionModel(**TINY["unet"]))
    rng = np.random.default_rng(seed)
    for model in models:
        model.set_train(False)
        for _, param in model.parameters_and_names():
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    return models


def randomize_lora(network, seed):
    rng = np.random.default_rng(seed)
    for module in network.loras:
        for param in (module.lora_down.weight, module.lora_up.weight):
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))


def unet_inputs(seed=3):
    rng = np.random.default_rng(seed)
    cfg = TINY["unet"]
    return (Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32)), Tensor(np.array([300], np.int32)),
            Tensor(rng.standard_normal((1, 8, cfg["context_dim"])).astype(np.float32)),
            Tensor(rng.standard_normal((1, cfg["adm_in_channels"])).astype(np.float32)))


def run_all(te1, te2, unet):
    ids = Tensor(np.array([[49406, 320, 1125, 49407] + [49407] * 4], np.int32))
    return te1(ids)[0].asnumpy(), te2(ids)[1].asnumpy(), unet(*unet_inputs()).asnumpy()


def header_of(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A conv-enabled network with random weights, saved once."""
    te1, te2, unet = build_models()
    network = lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    randomize_lora(network, 1)
    path = str(tmp_path_factory.mktemp("lora") / "trained.safetensors")
    network.save_weights(path, None, {"ss_network_dim": "4", "modelspec.title": "x"})
    return network, (te1, te2, unet), path


def test_saved_file_has_kohya_keys_layouts_and_metadata(trained):
    network, _, path = trained
    tensors = safetensors.numpy.load_file(path)
    names = [m.lora_name for m in network.loras]
    assert sorted(tensors) == sorted(f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert tensors["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].shape == (4, 64)  # Linear [out, in]
    assert tensors["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"].shape == (64, 4)
    assert tensors["lora_unet_input_blocks_3_0_op.lora_down.weight"].shape == (2, 32, 3, 3)  # Conv [out, in, kh, kw]
    assert tensors["lora_unet_input_blocks_3_0_op.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors["lora_unet_input_blocks_4_0_skip_connection.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"].shape == ()
    assert float(tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert float(tensors["lora_unet_input_blocks_3_0_op.alpha"]) == 1.0

    header, data_start = header_of(path)
    metadata = header["__metadata__"]
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "x"
    with open(path, "rb") as f:
        data = f.read()
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[data_start:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # file shorter than 1 MiB
    assert not os.path.exists(path + ".tmp")


def test_hashes_use_only_ss_metadata_on_a_large_file(tmp_path):
    tensors = {"x.lora_down.weight": np.arange(400_000, dtype=np.float32)}
    path = str(tmp_path / "big.safetensors")
    lora_io.write_lora_file(path, tensors, {"ss_a": "1", "modelspec.title": "not hashed"})
    reference = safetensors.numpy.save(tensors, metadata={"ss_a": "1"})
    metadata = header_of(path)[0]["__metadata__"]
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_model_hash"] == hashlib.sha256(tensors["x.lora_down.weight"].tobytes()).hexdigest()


@pytest.mark.parametrize("dtype, tag", [(ms.float16, "F16"), (ms.bfloat16, "BF16"), (np.float32, "F32")])
def test_save_precision(trained, tmp_path, dtype, tag):
    network, _, _ = trained
    path = str(tmp_path / "p.safetensors")
    network.save_weights(path, dtype, {})
    header, _ = header_of(path)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    loaded = safetensors.numpy.load_file(path)
    key = "lora_unet_middle_block_1_proj_out.lora_up.weight"
    np.testing.assert_allclose(loaded[key].astype(np.float32), network.lora_state_dict()[key], rtol=1e-2, atol=1e-3)


def test_save_load_round_trip(trained):
    network, _, path = trained
    te1, te2, unet = build_models(seed=5)
    fresh = lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="2", conv_alpha="1")
    result = fresh.load_weights(path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    saved, loaded = network.lora_state_dict(), fresh.lora_state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        np.testing.assert_array_equal(saved[key], loaded[key])


def test_load_reports_missing_unexpected_and_rejects_shapes(trained, tmp_path):
    network, _, path = trained
    tensors = safetensors.numpy.load_file(path)
    dropped = "lora_unet_input_blocks_4_1_proj_in.lora_up.weight"
    del tensors[dropped]
    tensors["lora_unet_nowhere.lora_down.weight"] = np.zeros((4, 4), np.float32)
    partial = str(tmp_path / "partial.safetensors")
    safetensors.numpy.save_file(tensors, partial)
    te1, te2, unet = build_models(seed=6)
    fresh = lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet, conv_dim="2")
    result = fresh.load_weights(partial)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == ["lora_unet_nowhere.lora_down.weight"]

    te1, te2, unet = build_models(seed=6)
    wider = lora.create_network(1.0, 8, 2.0, None, [te1, te2], unet)
    with pytest.raises(ValueError, match=r"shape mismatch for 'lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
                                         r"\.lora_down\.weight': file \(4, 32\), network \(8, 32\)"):
        wider.load_weights(path)

    foreign = str(tmp_path / "sd15.safetensors")
    safetensors.numpy.save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                 np.zeros((4, 768), np.float32)}, foreign)
    with pytest.raises(ValueError, match="SD 1.x/2.x LoRA"):
        wider.load_weights(foreign)
    with pytest.raises(ValueError, match="none of its 1 LoRA modules matches.*SD 1.x/2.x"):
        lora.create_network_from_weights(1.0, foreign, None, [te1, te2], unet, for_inference=True)


def layer(model, path):
    cell = model
    for part in path.split("."):
        cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
    return cell


@pytest.mark.parametrize("path, shape", [
    ("input_blocks.4.1.transformer_blocks.0.attn2.to_k", (2, 5, 64)),  # Dense, no bias
    ("input_blocks.4.1.proj_in", (2, 5, 64)),  # Dense with bias
    ("input_blocks.4.0.skip_connection", (2, 32, 8, 8)),  # 1x1 conv
    ("input_blocks.4.0.in_layers.2", (2, 32, 8, 8)),  # 3x3 conv
    ("input_blocks.3.0.op", (2, 32, 8, 8)),  # 3x3 conv, stride 2
])
def test_merge_equals_unmerged_with_multiplier(trained, path, shape):
    network, (_, _, unet), file = trained
    multiplier = 0.7
    _, _, plain_unet = build_models()  # same base weights as the trained network's UNet
    merger, weights = lora.create_network_from_weights(multiplier, file, None, [], plain_unet, for_inference=True)
    merger.merge_to(weights)
    x = Tensor(np.random.default_rng(4).standard_normal(shape).astype(np.float32))
    network.set_multiplier(multiplier)
    try:
        unmerged = layer(unet, path)(x).asnumpy()
    finally:
        network.set_multiplier(1.0)
    assert isinstance(layer(unet, path), lora.LoRAModule) and not isinstance(layer(plain_unet, path), lora.LoRAModule)
    merged = layer(plain_unet, path)(x).asnumpy()
    without = layer(unet, path).org_module(x).asnumpy()
    assert np.abs(merged - without).max() > 1e-2
    np.testing.assert_allclose(merged, unmerged, atol=MERGE_ATOL, rtol=1e-5)


# a file as a torch user's Kohya run writes it: Kohya's names (some UNet ones in the old diffusers form),
# torch layouts, fp16, one module without alpha (old files): (name, down shape, up shape, alpha)
TORCH_USER_MODULES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (4, 64), (64, 4), 1.0),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", (4, 64), (64, 4), 2.0),
    ("lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_0_proj", (8, 64), (512, 8), 4.0),
    ("lora_unet_mid_block_attentions_0_proj_in", (4, 64), (64, 4), None),
    ("lora_unet_middle_block_0_emb_layers_1", (4, 128), (64, 4), 1.0),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", (4, 32, 1, 1), (64, 4, 1, 1), 1.0),
    ("lora_unet_input_blocks_4_0_in_layers_2", (2, 32, 3, 3), (64, 2, 1, 1), 1.0),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", (2, 32, 3, 3), (32, 2, 1, 1), 2.0),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", (2, 64, 3, 3), (64, 2, 1, 1), 2.0),
    ("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", (4, 32), (32, 4), 1.0),
    ("lora_te2_text_model_encoder_layers_2_mlp_fc1", (4, 32), (64, 4), 3.0),
]


def test_torch_user_file_loads_and_merges_to_the_unmerged_output(tmp_path):
    rng = np.random.default_rng(7)
    tensors = {}
    for name, down, up, alpha in TORCH_USER_MODULES:
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal(down) * 0.3).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal(up) * 0.3).astype(np.float16)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, np.float16)
    path = str(tmp_path / "from_torch.safetensors")
    safetensors.numpy.save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})

    base = run_all(*build_models())
    te1, te2, unet = build_models()
    network, weights = lora.create_network_from_weights(0.8, path, None, [te1, te2], unet)
    assert len(network.loras) == len(TORCH_USER_MODULES)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in weights
    result = network.load_weights(path)
    # the old-style module has no alpha in the file: reported, and the network keeps alpha = dim from the file
    assert result.missing_keys == ["lora_unet_middle_block_1_proj_in.alpha"] and result.unexpected_keys == []
    unmerged = run_all(te1, te2, unet)

    te1, te2, unet = build_models()
    merger, weights = lora.create_network_from_weights(0.8, path, None, [te1, te2], unet, for_inference=True)
    merger.merge_to(weights)
    merged = run_all(te1, te2, unet)
    for b, u, m in zip(base, unmerged, merged):
        assert np.abs(u - b).max() > 1e-3
        np.testing.assert_allclose(m, u, atol=1e-4, rtol=1e-4)


def test_merging_two_files_adds_both(trained, tmp_path):
    _, _, path = trained
    x = Tensor(np.random.default_rng(8).standard_normal((1, 3, 64)).astype(np.float32))
    proj = "input_blocks.4.1.proj_in"
    _, _, once = build_models()
    for multiplier in (0.25, 0.5):
        merger, weights = lora.create_network_from_weights(multiplier, path, None, [], once, for_inference=True)
        merger.merge_to(weights)
    _, _, single = build_models()
    merger, weights = lora.create_network_from_weights(0.75, path, None, [], single, for_inference=True)
    merger.merge_to(weights)
    np.testing.assert_allclose(layer(once, proj)(x).asnumpy(), layer(single, proj)(x).asnumpy(), atol=MERGE_ATOL)


def test_dim_from_weights_rebuilds_the_same_modules(trained):
    network, _, path = trained
    te1, te2, unet = build_models()
    rebuilt, _ = lora.create_network_from_weights(1.0, path, None, [te1, te2], unet)
    original = {m.lora_name: (m.lora_down.weight.shape, m.scale) for m in network.loras}
    assert {m.lora_name: (m.lora_down.weight.shape, m.scale) for m in rebuilt.loras} == original


@pytest.mark.parametrize("diffusers, sgm", [
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks_2_attentions_1_proj_out", "input_blocks_8_1_proj_out"),
    ("down_blocks_0_resnets_1_conv1", "input_blocks_2_0_in_layers_2"),
    ("down_blocks_0_downsamplers_0_conv", "input_blocks_3_0_op"),
    ("down_blocks_1_downsamplers_0_conv", "input_blocks_6_0_op"),
    ("mid_block_attentions_0_transformer_blocks_9_ff_net_2", "middle_block_1_transformer_blocks_9_ff_net_2"),
    ("mid_block_resnets_1_time_emb_proj", "middle_block_2_emb_layers_1"),
    ("up_blocks_0_resnets_2_conv_shortcut", "output_blocks_2_0_skip_connection"),
    ("up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_v", "output_blocks_5_1_transformer_blocks_1_attn2_to_v"),
    ("up_blocks_2_resnets_0_conv2", "output_blocks_6_0_out_layers_3"),
    ("up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"),
    ("up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    ("time_embedding_linear_2", "time_embed_2"),
    ("add_embedding_linear_1", "label_emb_0_0"),
    ("down_blocks_0_resnets_0_norm1", None),  # not a LoRA-able layer: reported, not guessed
])
def test_diffusers_unet_names_convert_to_sgm(diffusers, sgm):
    assert lora_io.diffusers_to_sgm_module_name(diffusers) == sgm


def test_check_lora_weights_prints_modules_and_metadata(trained, capsys):
    network, _, path = trained
    check_lora_weights.main([path])
    out = capsys.readouterr().out
    n_unet, n_te = len(network.unet_loras), len(network.text_encoder_loras)
    assert f"modules: {n_unet + n_te} (te1: {n_te // 2}, te2: {n_te // 2}, unet: {n_unet})" in out
    assert "lora_unet_input_blocks_3_0_op,2,1,(2-32-3-3)" in out
    assert "  ss_network_dim: 4" in out
    assert f"number of LoRA modules: {2 * (n_unet + n_te)}" in out


def test_bf16_file_reads_back(tmp_path):
    path = str(tmp_path / "bf16.safetensors")
    value = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    safetensors.numpy.save_file({"lora_unet_x.lora_down.weight": value}, path)
    tensors, _ = lora_io.read_lora_file(path)
    np.testing.assert_array_equal(tensors["lora_unet_x.lora_down.weight"].astype(np.float32), [[1.5, -2.0]])
