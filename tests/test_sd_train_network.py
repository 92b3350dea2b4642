"""End-to-end SD 1.x and SD 2.x (v-parameterization) LoRA training through `train_network.py`'s command line, on
the tiny configs in graph mode: loss on a fixed batch, base weights, the file's keys and metadata, resume, flags.

Three runs share the module: a tiny SD1 run (text encoder and conv LoRA, clip_skip 2, state saved at step 20),
its resumption from that state, and a tiny SD2
`--v2 --v_parameterization` UNet-only run with a sample image at its end. `sd_minimal_inference.py` then
generates with the SD1 LoRA.
"""

import json
import os

import mindspore as ms
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sd_minimal_inference
import train_network
from library import model_util
from library.custom_train_functions import ddpm_alphas_cumprod
from networks.lora import base_state_dict
from test_lora_sd_layout import expected_text_encoder, expected_unet
from tools.make_tiny_checkpoint import make_tiny_checkpoint
from train_helpers import write_caption_images

pytestmark = pytest.mark.slow

STEPS = 30
TIMESTEPS = np.array([420, 480, 520, 580], np.int32)  # inside the runs' --min/--max_timestep
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_train")
    write_caption_images(root / "data" / "2_sks", 4)
    checkpoints = {}
    for name in ("tiny_sd1", "tiny_sd2"):
        checkpoints[name] = str(root / f"{name}.safetensors")
        make_tiny_checkpoint(checkpoints[name], name, seed=7)
    return root, checkpoints


def argv(workspace, config, output_dir, *extra):
    root, checkpoints = workspace
    return ["--pretrained_model_name_or_path", checkpoints[config], "--train_data_dir", str(root / "data"),
            "--resolution", "64", "--caption_extension", ".txt", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "2", "--output_dir", str(output_dir), "--output_name", "lora",
            "--seed", "11", "--learning_rate", "1e-2", "--train_batch_size", "2", "--min_timestep", "400",
            "--max_timestep", "600", "--cache_latents", *extra]


class Trainer(train_network.NetworkTrainer):
    """Records the trainer of the last run (train_network.main builds its own)."""

    last = None

    def train(self, args):
        Trainer.last = self
        return super().train(args)


def run_cli(monkeypatch, args):
    monkeypatch.setattr(train_network, "NetworkTrainer", Trainer)
    path = train_network.main(args)
    return path, Trainer.last


SD1_FLAGS = ("--max_train_steps", str(STEPS), "--clip_skip", "2", "--network_args", "conv_dim=4",
             "--save_every_n_steps", "20", "--save_state")


@pytest.fixture(scope="module")
def sd1_run(workspace):
    root, _ = workspace
    output_dir = root / "sd1"
    with pytest.MonkeyPatch.context() as monkeypatch:
        path, trainer = run_cli(monkeypatch, argv(workspace, "tiny_sd1", output_dir, *SD1_FLAGS))
    return path, trainer


@pytest.fixture(scope="module")
def sd2_run(workspace):
    root, _ = workspace
    prompts = root / "prompts.txt"
    prompts.write_text("sks picture number 1 --w 64 --h 64 --s 2 --d 3\n")
    with pytest.MonkeyPatch.context() as monkeypatch:
        path, trainer = run_cli(monkeypatch, argv(workspace, "tiny_sd2", root / "sd2", "--v2", "--v_parameterization",
                                                  "--max_train_steps", str(STEPS), "--network_train_unet_only",
                                                  "--sample_prompts", str(prompts),
                                                  "--sample_every_n_steps", str(STEPS)))
    return path, trainer


def read_lora(path):
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def lora_keys(expected: dict) -> set:
    return {f"{name}.{suffix}" for name in expected for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}


def fixed_batch(workspace, checkpoint, v2):
    """Latents of the four training images (the checkpoint's VAE, posterior mean, scaled), fixed noise."""
    root, _ = workspace
    _, vae, _ = model_util.load_models_from_stable_diffusion_checkpoint(v2, checkpoint)
    images = np.stack([np.asarray(Image.open(root / "data" / "2_sks" / f"img{i}.png"), np.float32).transpose(2, 0, 1)
                       / 127.5 - 1 for i in range(4)])
    latents = vae.encode(ms.Tensor(images))[0].asnumpy() * train_network.NetworkTrainer.vae_scale_factor
    noise = np.random.default_rng(5).standard_normal(latents.shape).astype(np.float32)
    return latents, noise


def fixed_batch_loss(trainer, args, latents, noise, v_parameterization):
    """The trained UNet's loss on one fixed batch, eagerly (independent of the train step): MSE to the noise, or to
    the velocity sqrt(a) * noise - sqrt(1 - a) * x0 with v-parameterization."""
    alphas = ddpm_alphas_cumprod()[TIMESTEPS].reshape(-1, 1, 1, 1)
    noisy = np.sqrt(alphas) * latents + np.sqrt(1 - alphas) * noise
    target = np.sqrt(alphas) * noise - np.sqrt(1 - alphas) * latents if v_parameterization else noise
    ids = trainer.load_tokenizer(args).tokenize([f"sks picture number {i}" for i in range(4)])
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    try:
        text_conds = train_network.sd_get_text_cond(trainer.text_encoders[0], ms.Tensor(ids), args.clip_skip,
                                                    ms.float32)
        pred = trainer.unet(ms.Tensor(noisy.astype(np.float32)), ms.Tensor(TIMESTEPS), text_conds).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    return float(((pred - target) ** 2).mean())


def assert_loss_went_down(trainer, args, latents, noise, v_parameterization):
    # multiplier 0 is exactly the untrained model: Kohya's lora_up starts at zero
    trainer.network.set_train(False)
    trained = fixed_batch_loss(trainer, args, latents, noise, v_parameterization)
    trainer.network.set_multiplier(0.0)
    untrained = fixed_batch_loss(trainer, args, latents, noise, v_parameterization)
    trainer.network.set_multiplier(1.0)
    assert trained < untrained * 0.9, (trained, untrained)


def assert_base_weights_unchanged(trainer, checkpoint, v2):
    text_encoder, _, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, checkpoint)
    for trained_model, fresh in ((trainer.unet, unet), (trainer.text_encoders[0], text_encoder)):
        fresh_params = {name: param for name, param in fresh.parameters_and_names()}
        trained_params = base_state_dict(trained_model)
        assert sorted(trained_params) == sorted(fresh_params)
        for name, param in trained_params.items():
            np.testing.assert_array_equal(param.asnumpy(), fresh_params[name].asnumpy(), err_msg=name)


def test_sd1_run_writes_upstreams_file_and_learns(workspace, sd1_run):
    path, trainer = sd1_run
    root, checkpoints = workspace
    assert path == str(root / "sd1" / "lora.safetensors")
    tensors, metadata = read_lora(path)
    tiny = json.load(open(os.path.join(CONFIGS, "tiny_sd1.json")))
    expected = {**expected_unet(True, 32, False, widths=tiny["unet"]["block_out_channels"], conv_dim=4),
                **expected_text_encoder(3, 32, 64)}
    assert set(tensors) == lora_keys(expected)
    for name, (down, up) in expected.items():
        assert tensors[f"{name}.lora_down.weight"].shape == down and tensors[f"{name}.lora_up.weight"].shape == up
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0  # conv_alpha's default
    assert all(np.abs(tensors[f"{n}.lora_up.weight"]).max() > 0 for n in expected if n.startswith("lora_unet"))
    assert any(np.abs(tensors[f"{n}.lora_up.weight"]).max() > 0 for n in expected if n.startswith("lora_te_"))

    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_v2"] == "False" and metadata["ss_clip_skip"] == "2"
    assert metadata["ss_steps"] == str(STEPS) and metadata["ss_network_args"] == '{"conv_dim": "4", "dropout": null}'
    assert metadata["ss_sd_model_name"] == "tiny_sd1.safetensors"
    assert {k: metadata[k] for k in metadata if k.startswith("modelspec.") and k not in (
        "modelspec.date", "modelspec.implementation_version")} == {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "lora", "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "2", "modelspec.timestep_range": "400,600",
    }

    assert_base_weights_unchanged(trainer, checkpoints["tiny_sd1"], v2=False)
    args = train_network.setup_parser().parse_args(argv(workspace, "tiny_sd1", root / "unused", *SD1_FLAGS))
    latents, noise = fixed_batch(workspace, checkpoints["tiny_sd1"], v2=False)
    assert_loss_went_down(trainer, args, latents, noise, v_parameterization=False)


def test_sd1_resume_continues_the_uninterrupted_run(workspace, sd1_run, monkeypatch):
    root, _ = workspace
    full_path, _ = sd1_run
    state = root / "sd1" / "lora-step00000020-state"
    resumed_path, resumed = run_cli(monkeypatch, argv(workspace, "tiny_sd1", root / "sd1_resumed", *SD1_FLAGS,
                                                      "--resume", str(state)))
    assert resumed.compiled_step.num_compiles == 1  # one graph for the whole run, as for SDXL
    full, full_meta = read_lora(full_path)
    again, again_meta = read_lora(resumed_path)
    assert again_meta["ss_steps"] == full_meta["ss_steps"] == str(STEPS)
    assert set(again) == set(full)
    for key, value in full.items():
        np.testing.assert_allclose(again[key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_sd2_v_parameterization_run(workspace, sd2_run):
    path, trainer = sd2_run
    root, checkpoints = workspace
    tensors, metadata = read_lora(path)
    tiny = json.load(open(os.path.join(CONFIGS, "tiny_sd2.json")))
    expected = expected_unet(False, 32, True, widths=tiny["unet"]["block_out_channels"])  # Linear projections
    assert set(tensors) == lora_keys(expected)
    for name, (down, up) in expected.items():
        assert tensors[f"{name}.lora_down.weight"].shape == down and tensors[f"{name}.lora_up.weight"].shape == up
    # upstream: sd_v2 plus _v for v-parameterization (model_util.get_model_version_str_for_sd1_sd2)
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert metadata["modelspec.prediction_type"] == "v" and metadata["modelspec.implementation"] == "diffusers"

    # the sample image of the last step, named as upstream names it (the prompt's seed 3 at the end)
    (sample,) = os.listdir(root / "sd2" / "sample")
    assert sample.startswith(f"lora_{STEPS:06d}_00_") and sample.endswith("_3.png")
    assert Image.open(root / "sd2" / "sample" / sample).size == (64, 64)

    assert_base_weights_unchanged(trainer, checkpoints["tiny_sd2"], v2=True)
    args = train_network.setup_parser().parse_args(argv(workspace, "tiny_sd2", root / "unused", "--v2",
                                                        "--v_parameterization"))
    latents, noise = fixed_batch(workspace, checkpoints["tiny_sd2"], v2=True)
    assert_loss_went_down(trainer, args, latents, noise, v_parameterization=True)


def test_sd_minimal_inference_with_the_sd1_lora(workspace, sd1_run, tmp_path):
    _, checkpoints = workspace
    lora_path, _ = sd1_run
    common = ["--ckpt_path", checkpoints["tiny_sd1"], "--prompt", "sks picture number 1", "--target_height", "64",
              "--target_width", "64", "--steps", "2", "--seed", "1", "--mode", "pynative", "--clip_skip", "2"]
    images = {}
    for name, lora_args in (("plain", []), ("zero", ["--lora_weights", f"{lora_path};0"]),
                            ("lora", ["--lora_weights", lora_path])):
        sd_minimal_inference.main(common + lora_args + ["--output_dir", str(tmp_path / name)])
        (png,) = os.listdir(tmp_path / name)
        images[name] = np.asarray(Image.open(tmp_path / name / png))
    ms.set_context(mode=ms.GRAPH_MODE)
    assert images["plain"].shape == (64, 64, 3)
    np.testing.assert_array_equal(images["zero"], images["plain"])  # merged with multiplier 0: the base model
    assert np.abs(images["lora"].astype(int) - images["plain"]).max() > 0


@pytest.mark.parametrize("extra, message", [
    # upstream's train_network.py has no text-encoder output caching for SD 1.x / 2.x: argparse refuses the flag
    (("--cache_text_encoder_outputs",), "unrecognized arguments: --cache_text_encoder_outputs"),
    (("--enable_bucket", "--bucket_reso_steps", "32", "--min_bucket_reso", "64", "--max_bucket_reso", "128"),
     "bucket_reso_steps is 32; it must be divisible by 64"),
    (("--clip_skip", "4"), "--clip_skip must be between 1 and 3"),
])
def test_sd_specific_refusals(workspace, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train_network.main(argv(workspace, "tiny_sd1", tmp_path, *extra))
    assert message in str(e.value) + capsys.readouterr().err
    assert not any(name.endswith(".safetensors") for name in os.listdir(tmp_path))
