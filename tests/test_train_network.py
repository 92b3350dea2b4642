"""End-to-end SDXL LoRA training on the tiny model, in graph mode: loss, files, resume, flags."""

import gc
import hashlib
import json
import logging
import os
import re
import weakref

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sdxl_train_network
import train_network
from library.custom_train_functions import ddpm_alphas_cumprod
from networks.lora import base_state_dict
from train_helpers import write_training_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt, data_dir = write_training_workspace(root, num_images=4, num_repeats=2)
    return root, ckpt, data_dir


def parse(workspace, output_dir, *extra):
    _, ckpt, data_dir = workspace
    return sdxl_train_network.setup_parser().parse_args([
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data_dir, "--resolution", "64",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "2", "--output_dir", str(output_dir), "--output_name", "lora", "--seed", "11",
        *extra,
    ])


# upstream's train_network.py train(): the metadata dict, its "without --dataset_config" update, ss_network_args
# (args.network_args given), the model name and hashes (the path exists), the save-time keys (save_model) and
# network.save_weights' sshs hashes
UPSTREAM_METADATA_KEYS = {
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr",
    "ss_unet_lr", "ss_num_train_images", "ss_num_validation_images", "ss_num_reg_images", "ss_num_batches_per_epoch",
    "ss_num_epochs", "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_dropout", "ss_mixed_precision", "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip",
    "ss_max_token_length", "ss_cache_latents", "ss_seed", "ss_lowram", "ss_noise_offset",
    "ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_adaptive_noise_scale", "ss_zero_terminal_snr",
    "ss_training_comment", "ss_sd_scripts_commit_hash", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_face_crop_aug_range",
    "ss_prior_loss_weight", "ss_min_snr_gamma", "ss_scale_weight_norms", "ss_ip_noise_gamma",
    "ss_debiased_estimation", "ss_noise_offset_random_strength", "ss_ip_noise_gamma_random_strength",
    "ss_loss_type", "ss_huber_schedule", "ss_huber_scale", "ss_huber_c", "ss_fp8_base", "ss_fp8_base_unet",
    "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps", "ss_resize_interpolation",
    # without --dataset_config
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale", "ss_min_bucket_reso",
    "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency",
    "ss_bucket_info",
    "ss_network_args", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
    "ss_training_finished_at", "ss_steps", "ss_epoch", "sshs_model_hash", "sshs_legacy_hash",
}


def read_lora(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def expected_lora_names(ckpt_path, with_text_encoders=True, with_conv=False):
    """Kohya's module names, derived from the checkpoint's key layout (independent of networks.lora)."""
    with safe_open(ckpt_path, framework="np") as f:
        keys = list(f.keys())
    names = set()
    unet = re.compile(r"model\.diffusion_model\.(.*(?:attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2)|proj_in|proj_out))\.weight$")
    te1 = re.compile(r"conditioner\.embedders\.0\.transformer\.(text_model\.encoder\.layers\.\d+\.(?:self_attn\.[qkvo]\w*_proj|mlp\.fc[12]))\.weight$")
    te2 = re.compile(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
    # with conv_dim: ResnetBlock2D convs, time-embedding Dense and skip, Downsample op, Upsample conv
    conv = re.compile(r"model\.diffusion_model\.(.*(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|\.0\.op|\.\d\.conv))\.weight$")
    for key in keys:
        if (m := unet.match(key)) or (with_conv and (m := conv.match(key))):
            names.add("lora_unet_" + m.group(1).replace(".", "_"))
        if with_text_encoders and (m := te1.match(key)):
            names.add("lora_te1_" + m.group(1).replace(".", "_"))
        if with_text_encoders and (m := te2.match(key)):
            prefix = f"lora_te2_text_model_encoder_layers_{m.group(1)}_"
            names.update(prefix + part for part in
                         ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"))
    return names


def fixed_batch_loss(trainer, latents, text_conds, noise, timesteps):
    """Epsilon-prediction MSE of the trained UNet on one fixed batch (PyNative, independent of the train step)."""
    alphas = ddpm_alphas_cumprod()[timesteps].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(alphas) * latents + np.sqrt(1 - alphas) * noise
    sizes = ms.Tensor(np.array([[64, 64]] * len(latents), np.int32))
    crops = ms.Tensor(np.zeros((len(latents), 2), np.int32))
    pred = sdxl_train_network.sdxl_call_unet(
        trainer.unet, ms.Tensor(noisy.astype(np.float32)), ms.Tensor(timesteps), text_conds, sizes, crops, sizes,
        ms.float32,
    )
    return float(((pred.asnumpy() - noise) ** 2).mean())


def test_end_to_end_training_run(workspace, tmp_path):
    root, ckpt, _ = workspace
    args = parse(workspace, tmp_path, "--max_train_steps", "30", "--learning_rate", "1e-2", "--train_batch_size", "2",
                 "--min_timestep", "400", "--max_timestep", "600", "--save_every_n_steps", "20",
                 "--network_args", "conv_dim=4")
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    final_path = trainer.train(args)
    assert final_path == str(tmp_path / "lora.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["lora-step00000020.safetensors", "lora.safetensors"]

    tensors, metadata = read_lora(final_path)
    names = expected_lora_names(ckpt, with_conv=True)
    # tiny UNet: 12 transformer blocks x 10 + 6 x proj_in/out = 132; with conv_dim 17 resnets x (in, out, emb)
    # + 10 skip convs (input_blocks.4 and every output block) + 2 Downsample + 2 Upsample = 65; TEs 2 x 3 layers x 6
    assert len(names) == 132 + 65 + 36
    assert set(tensors) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert tensors["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].shape == (4, 64)
    assert tensors["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"].shape == (64, 4)
    assert float(tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].shape == (32, 4, 1, 1)
    assert float(tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"]) == 1.0  # conv_alpha default
    # LoRA weights trained: up starts at zero in Kohya's init
    assert all(np.abs(tensors[f"{n}.lora_up.weight"]).max() > 0 for n in names if n.startswith("lora_unet"))
    assert any(np.abs(tensors[f"{n}.lora_up.weight"]).max() > 0 for n in names if n.startswith("lora_te"))

    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_steps"] == "30" and metadata["ss_max_train_steps"] == "30"
    assert metadata["ss_num_train_images"] == "8" and metadata["ss_seed"] == "11"
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.title"] == "lora"
    with open(final_path, "rb") as f:
        data = f.read()
    header_len = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()

    # the keys upstream's train_network.train writes for a --train_data_dir run with --network_args (see
    # UPSTREAM_METADATA_KEYS), plus ss_num_processes (msrun's process count, ours)
    assert {k for k in metadata if not k.startswith("modelspec.")} == UPSTREAM_METADATA_KEYS | {"ss_num_processes"}
    # upstream: net_kwargs from --network_args, then net_kwargs["dropout"] = args.network_dropout (None -> null)
    assert metadata["ss_network_args"] == '{"conv_dim": "4", "dropout": null}'
    with open(ckpt, "rb") as f:
        ckpt_bytes = f.read()
    # upstream's train_util.model_hash (64 KiB at 1 MiB, 8 hex digits) and calculate_sha256 (the whole file)
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(ckpt_bytes[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(ckpt_bytes).hexdigest()
    assert metadata["ss_sd_model_name"] == "tiny.safetensors"

    # base weights are bit-identical to the checkpoint
    with safe_open(ckpt, framework="np") as f:
        for name, param in base_state_dict(trainer.unet).items():
            np.testing.assert_array_equal(param.asnumpy(), f.get_tensor("model.diffusion_model." + name), err_msg=name)

    # the saved file loads back into a fresh network: same tensors
    from networks import lora
    from library import sdxl_model_util

    te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(ckpt)
    fresh = lora.create_network(1.0, 4, 2, vae, [te1, te2], unet, conv_dim=4)
    missing, unexpected = fresh.load_weights(final_path)
    assert not missing and not unexpected
    reloaded = fresh.lora_state_dict()
    for key, value in tensors.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)

    # the loss on a fixed batch went down: multiplier 0 is exactly the untrained model (up weights were 0)
    image_dir = root / "data" / "2_sks"
    images = np.stack([np.asarray(Image.open(image_dir / f"img{i}.png"), np.float32).transpose(2, 0, 1) / 127.5 - 1
                       for i in range(4)])
    latents = trainer.vae.encode(ms.Tensor(images))[0].asnumpy() * 0.13025
    noise = np.random.default_rng(5).standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([420, 480, 520, 580], np.int32)
    ids = trainer.load_tokenizer(args).tokenize([f"sks picture number {i}" for i in range(4)])
    text_conds = sdxl_train_network.sdxl_get_text_cond(*trainer.text_encoders, ms.Tensor(ids[0]), ms.Tensor(ids[1]))
    trainer.network.set_train(False)
    trained = fixed_batch_loss(trainer, latents, text_conds, noise, timesteps)
    trainer.network.set_multiplier(0.0)
    text_conds = sdxl_train_network.sdxl_get_text_cond(*trainer.text_encoders, ms.Tensor(ids[0]), ms.Tensor(ids[1]))
    untrained = fixed_batch_loss(trainer, latents, text_conds, noise, timesteps)
    assert trained < untrained * 0.9, (trained, untrained)


class ModelRecordingTrainer(sdxl_train_network.SdxlNetworkTrainer):
    """Keeps weak references to the text encoders and the VAE it loads."""

    def load_target_model(self, args, weight_dtype):
        text_encoders, vae, unet = super().load_target_model(args, weight_dtype)
        self.cached_model_refs = [weakref.ref(model) for model in (*text_encoders, vae)]
        return text_encoders, vae, unet


def test_resume_continues_the_uninterrupted_run(workspace, tmp_path):
    # bf16 has no CPU matmul: both runs compute in fp32 (and record it), which the exact comparison below needs
    common = ("--max_train_steps", "4", "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--cache_latents",
              "--cache_text_encoder_outputs", "--network_train_unet_only", "--save_every_n_steps", "2", "--save_state",
              "--mixed_precision", "bf16")
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = ModelRecordingTrainer()
    full.train(parse(workspace, full_dir, *common))
    # the caches replaced the VAE and both text encoders: nothing holds them any more
    gc.collect()
    assert [ref() for ref in full.cached_model_refs] == [None, None, None]
    assert full.vae is None and full.text_encoders == (None, None)
    state_dir = full_dir / "lora-step00000002-state"
    assert json.loads((state_dir / "train_state.json").read_text()) == {"current_epoch": 0, "current_step": 2, "world_size": 1}
    assert sorted(os.listdir(state_dir)) == [
        "model.safetensors", "optimizer.safetensors", "random_states.json", "scheduler.json", "train_state.json"]

    resumed = sdxl_train_network.SdxlNetworkTrainer()
    resumed.train(parse(workspace, resumed_dir, *common, "--resume", str(state_dir)))
    # the step counter continued (upstream restarts at 0): the resumed run saved no step-2 file, only step 4
    assert not (resumed_dir / "lora-step00000002.safetensors").exists()
    assert json.loads((resumed_dir / "lora-state" / "train_state.json").read_text())["current_step"] == 4

    full_weights, full_meta = read_lora(str(full_dir / "lora.safetensors"))
    resumed_weights, resumed_meta = read_lora(str(resumed_dir / "lora.safetensors"))
    assert resumed_meta["ss_steps"] == full_meta["ss_steps"] == "4"
    assert full_meta["ss_mixed_precision"] == "no"  # what ran, not the flag
    for key, value in full_weights.items():
        np.testing.assert_allclose(resumed_weights[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert resumed.network is not None
    assert json.loads((resumed_dir / "lora-state" / "scheduler.json").read_text()) == \
        json.loads((full_dir / "lora-state" / "scheduler.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (("--network_module", "networks.lycoris"), "only networks.lora"),
    (("--cache_text_encoder_outputs",), "requires --network_train_unet_only"),
    (("--full_fp16",), "--full_fp16 requires --mixed_precision fp16"),
    (("--adaptive_noise_scale", "0.1"), "adaptive_noise_scale requires noise_offset"),
    (("--optimizer_type", "DAdaptAdamW"), "DAdaptAdamW"),
    (("--lr_scheduler", "warmup_stable_decay"), "--lr_scheduler warmup_stable_decay"),
    (("--deepspeed",), "--deepspeed: DeepSpeed is torch-only"),
    (("--weighted_captions", "--cache_text_encoder_outputs", "--network_train_unet_only"),
     "--weighted_captions cannot be used with --cache_text_encoder_outputs"),
    (("--save_model_as", "ckpt"), "only 'safetensors'"),
    (("--cache_latents", "--color_aug"), "color_aug"),
    (("--network_args", "conv_dim"), "expected key=value"),
])
def test_bad_flags_fail_before_model_loading(workspace, tmp_path, extra, message):
    args = parse(workspace, tmp_path, *extra)
    args.pretrained_model_name_or_path = str(tmp_path / "does_not_exist.safetensors")  # loading would fail differently
    with pytest.raises(ValueError, match=re.escape(message) if "(" not in message else message):
        sdxl_train_network.SdxlNetworkTrainer().train(args)
    assert not any(name.endswith(".safetensors") for name in os.listdir(tmp_path))


def test_cli_reports_errors_without_traceback(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sdxl_train_network.main(["--train_data_dir", str(tmp_path / "missing"), "--network_module", "networks.lora",
                                 "--output_dir", str(tmp_path), "--pretrained_model_name_or_path", "x.safetensors"])
    assert "error:" in str(e.value) and "missing" in str(e.value)


def test_bf16_on_cpu_computes_in_fp32_with_one_warning(caplog):
    args = sdxl_train_network.setup_parser().parse_args(["--mixed_precision", "bf16", "--full_bf16"])
    with caplog.at_level(logging.WARNING):
        assert train_network.prepare_dtype(args)[0] == ms.float32
        assert train_network.vae_dtype_for(args) == ms.float32  # a second call: no second warning
    assert [r.getMessage() for r in caplog.records] == [
        "--mixed_precision bf16: MindSpore has no bf16 matmul on CPU; computing in fp32 instead"]
    assert args.mixed_precision == "no" and not args.full_bf16  # what ss_mixed_precision records
