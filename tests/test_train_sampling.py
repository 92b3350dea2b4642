"""Sample images and validation loss during a tiny training run: upstream's schedules, file names and TensorBoard
tags, and training that is bit-identical to the same run without them."""

import os
import re

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sdxl_train_network
from test_graph_compile import logged_losses, lora_tensors
from train_helpers import tensorboard_events, write_training_workspace

pytestmark = pytest.mark.slow


def flags(ckpt, data_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data_dir, "--resolution", "64",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "2", "--learning_rate", "1e-3", "--max_train_steps", "3", "--network_train_unet_only",
        "--cache_latents", "--cache_text_encoder_outputs", "--seed", "11", "--output_dir", str(output_dir),
        "--output_name", "lora", "--logging_dir", str(output_dir / "logs"),
        # schedule-free: sampling and saving switch to its evaluation weights and back, which must be exact too
        "--optimizer_type", "AdamWScheduleFree", *extra,
    ]


def test_sampling_and_validation_follow_upstreams_schedules_and_leave_training_unchanged(tmp_path):
    # 4 images, half held out for validation: both runs train on the same 2 (the first never validates)
    ckpt, data_dir = write_training_workspace(tmp_path, num_images=4, num_repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment lines are skipped\n"
                       "a sks picture --w 64 --h 64 --s 2 --d 5\n"
                       "\n"
                       "another sks picture --n blurry --h 128 --w 64 --s 3 --ss euler_a\n")
    plain_dir, sampled_dir = tmp_path / "plain", tmp_path / "sampled"
    split = ("--validation_split", "0.5", "--validation_seed", "3")
    sdxl_train_network.SdxlNetworkTrainer().train(sdxl_train_network.setup_parser().parse_args(flags(
        ckpt, data_dir, plain_dir, *split, "--validate_every_n_epochs", "1000")))
    sdxl_train_network.SdxlNetworkTrainer().train(sdxl_train_network.setup_parser().parse_args(flags(
        ckpt, data_dir, sampled_dir, *split, "--validate_every_n_steps", "2", "--sample_prompts", str(prompts),
        "--sample_at_first", "--sample_every_n_steps", "2", "--sample_sampler", "ddim")))

    # before the first step (named as epoch 0, as upstream) and after step 2, each prompt once; the --d seed ends
    # the name
    names = sorted(os.listdir(sampled_dir / "sample"))
    pattern = re.compile(r"lora_(e?\d{6})_(\d{2})_\d{14}(_5)?\.png")
    matches = [pattern.fullmatch(name) for name in names]
    assert all(matches), names
    assert sorted((m[1], m[2], m[3]) for m in matches) == [
        ("000002", "00", "_5"), ("000002", "01", None), ("e000000", "00", "_5"), ("e000000", "01", None)]
    for name, m in zip(names, matches):
        with Image.open(sampled_dir / "sample" / name) as image:
            assert image.size == ((64, 64) if m[2] == "00" else (64, 128))  # (width, height)
            assert image.text["prompt"] == ("a sks picture" if m[2] == "00" else "another sks picture")
            assert image.text["sampler"] == ("ddim" if m[2] == "00" else "euler_a")
            assert np.asarray(image).std() > 0  # an image, not a blank

    # TensorBoard got each prompt's image at steps 0 and 2
    images = sorted((event.step, v.tag) for event in tensorboard_events(sampled_dir) for v in event.summary.value
                    if v.HasField("image"))
    assert images == [(0, "sample_0"), (0, "sample_1"), (2, "sample_0"), (2, "sample_1")]

    # validation after step 2 and after each of the 2 epochs (every epoch unless --validate_every_n_epochs), on
    # the 2 held-out images
    validation = sorted((event.step, v.tag) for event in tensorboard_events(sampled_dir) for v in event.summary.value
                        if v.tag.startswith("loss/validation/"))
    assert validation == [(1, "loss/validation/epoch_average"), (1, "loss/validation/epoch_divergence"),
                          (2, "loss/validation/epoch_average"), (2, "loss/validation/epoch_divergence"),
                          (2, "loss/validation/step_average"), (2, "loss/validation/step_divergence")]
    assert not any(v.tag.startswith("loss/validation/") for event in tensorboard_events(plain_dir)
                   for v in event.summary.value)
    with safe_open(str(sampled_dir / "lora.safetensors"), framework="np") as f:
        metadata = f.metadata()
    assert metadata["ss_num_validation_images"] == "2" and metadata["ss_validation_split"] == "0.5"

    # sampling and validation drew nothing from training's random streams and changed no weight
    assert logged_losses(sampled_dir) == logged_losses(plain_dir)
    plain, sampled = lora_tensors(plain_dir / "lora.safetensors"), lora_tensors(sampled_dir / "lora.safetensors")
    assert plain.keys() == sampled.keys()
    for key in plain:
        np.testing.assert_array_equal(sampled[key], plain[key], err_msg=key)


def test_a_bad_prompt_file_fails_before_any_model_loads(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fine prompt\na bad one --w wide\n")
    args = sdxl_train_network.setup_parser().parse_args(flags(
        str(tmp_path / "missing.safetensors"), str(tmp_path / "no_data"), tmp_path / "out",
        "--sample_prompts", str(prompts)))
    with pytest.raises(ValueError, match=r"--sample_prompts: .*prompts\.txt: line 2: --w"):
        sdxl_train_network.SdxlNetworkTrainer().train(args)
    assert not (tmp_path / "out").exists()
