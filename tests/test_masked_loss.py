"""Masked loss (--masked_loss with conditioning_data_dir masks, alpha_mask): the loss against numpy, masks that follow
their image through resize, crop and flip, the latent cache's alpha_mask, mask matching, and a real tiny run."""

import argparse

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from PIL import Image
from safetensors.numpy import load_file

import sdxl_train_network
from library import caching, config_util, custom_train_functions as ctf, train_util
from library.noise_sampling import NoiseSampler
from tests.dataset_helpers import FakeTokenizeStrategy, write_image
from train_helpers import tensorboard_events, write_training_workspace


def masked_parse(argv=()):
    """The trainer's dataset and masked-loss flags."""
    parser = argparse.ArgumentParser()
    train_util.add_dataset_arguments(parser, True, True, True)
    config_util.add_config_arguments(parser)
    ctf.add_masked_loss_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    return parser.parse_args(list(argv))


def build(toml_text, tmp_path, argv=("--masked_loss",), seed=5):
    (tmp_path / "config.toml").write_text(toml_text)
    args = masked_parse(["--dataset_config", str(tmp_path / "config.toml"), *argv])
    user_config, source = config_util.user_config_from_args(args)
    blueprint = config_util.generate_blueprint(user_config, args, source)
    return config_util.generate_dataset_group_by_blueprint(blueprint, seed, FakeTokenizeStrategy())


def error_of(toml_text, tmp_path, argv=("--masked_loss",)):
    with pytest.raises(ValueError) as e:
        build(toml_text, tmp_path, argv)
    return str(e.value)


def config(image_dir, extra_subset="", extra_general="", batch_size=1, enable_bucket=True):
    return f"""
[general]
resolution = 64
enable_bucket = {str(enable_bucket).lower()}
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
caption_extension = ".txt"
{extra_general}
[[datasets]]
batch_size = {batch_size}
  [[datasets.subsets]]
  image_dir = "{image_dir}"
  {extra_subset}
"""


def fields(group, index):
    arrays, details = group.get_batch(index)
    return dict(zip(group.batch_fields, arrays)), details


def area_resize(masks, factor=8):
    """Numpy "area" interpolation by an integer factor: the mean of each factor x factor block."""
    b, c, h, w = masks.shape
    return masks.reshape(b, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


# ----- the loss ------------------------------------------------------------------------------------------------


class MaskedLoss(nn.Cell):
    def __init__(self, helper):
        super().__init__()
        self.helper = helper

    def construct(self, model_pred, target, timesteps, loss_weights, masks):
        return self.helper.compute_loss(model_pred, target, timesteps, loss_weights, masks)


def test_masked_loss_equals_numpy_masked_mse_in_a_dynamic_shape_graph():
    """Per pixel, then per-sample mean, then loss_weights; one graph for two bucket shapes."""
    cell = MaskedLoss(ctf.DiffusionNoiseAndLoss())
    cell.set_inputs(ms.Tensor(shape=[None, 4, None, None], dtype=ms.float32),
                    ms.Tensor(shape=[None, 4, None, None], dtype=ms.float32),
                    ms.Tensor(shape=[None], dtype=ms.int32), ms.Tensor(shape=[None], dtype=ms.float32),
                    ms.Tensor(shape=[None, 1, None, None], dtype=ms.float32))
    rng = np.random.default_rng(3)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for b, h, w in [(2, 32, 48), (1, 64, 16)]:
            masks = np.zeros((b, 1, h, w), np.float32)
            masks[:, :, : h // 2] = 1.0  # top half trains
            masks[:, :, h // 2 :, : w // 2] = 127 / 255  # bottom left at about half weight
            masks[:, :, 3:11, 5:7] = 0.25  # a patch straddling 8x8 blocks
            pred = rng.standard_normal((b, 4, h // 8, w // 8)).astype(np.float32)
            target = rng.standard_normal(pred.shape).astype(np.float32)
            loss_weights = np.array([1.0, 0.6][:b], np.float32)
            out = cell(*(ms.Tensor(a) for a in (pred, target, np.full(b, 500, np.int32), loss_weights, masks)))
            per_sample = ((pred - target) ** 2 * area_resize(masks)).mean(axis=(1, 2, 3))
            np.testing.assert_allclose(float(out.asnumpy()), (per_sample * loss_weights).mean(), rtol=1e-6)
            unmasked = ((pred - target) ** 2).mean(axis=(1, 2, 3))
            assert abs((unmasked * loss_weights).mean() - float(out.asnumpy())) > 0.05  # the mask matters
    finally:
        ms.set_context(mode=mode)


# ----- masks follow their image ---------------------------------------------------------------------------------


def write_patterned(image_dir, mask_dir, sizes, alpha=False):
    """Images of random noise whose red channel is also their mask: in the mask folder, or as the alpha channel."""
    rng = np.random.default_rng(1)
    image_dir.mkdir(parents=True, exist_ok=True)
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if alpha:
            Image.fromarray(np.dstack([pixels, pixels[:, :, 0]])).save(image_dir / f"img{i}.png")
        else:
            Image.fromarray(pixels).save(image_dir / f"img{i}.png")
            Image.fromarray(pixels[:, :, 0]).save(mask_dir / f"img{i}.png")  # a grey-level mask
        (image_dir / f"img{i}.txt").write_text(f"picture {i}")


@pytest.mark.parametrize("source", ["conditioning_data_dir", "alpha_mask"])
@pytest.mark.parametrize("bucketing", [True, False])
def test_mask_is_resized_cropped_and_flipped_with_its_image(tmp_path, source, bucketing):
    # bucketing: 100x70 shrinks to 91x64 and is cropped to the 64x64 bucket at a random offset along the width;
    # without bucketing, images larger than the 64x64 resolution are cropped at random along both axes
    sizes = [(100, 70), (70, 100)] if bucketing else [(80, 90), (90, 72)]
    mask_dir = tmp_path / "masks" if source == "conditioning_data_dir" else None
    write_patterned(tmp_path / "img", mask_dir, sizes, alpha=source == "alpha_mask")
    subset = f'conditioning_data_dir = "{mask_dir}"' if mask_dir else "alpha_mask = true"
    group, _ = build(config(tmp_path / "img", subset + "\n  random_crop = true\n  flip_aug = true",
                            enable_bucket=bucketing), tmp_path)
    assert group.batch_fields[-1] == "alpha_masks"
    seen_masks, flips = set(), set()
    for epoch in range(1, 7):
        group.set_current_epoch(epoch)
        for index in range(len(group)):
            batch, details = fields(group, index)
            red = (batch["images"][:, 0] + 1.0) * 127.5  # the image's red channel in 0..255
            np.testing.assert_allclose(batch["alpha_masks"][:, 0] * 255.0, red, atol=2e-3)
            seen_masks.add(batch["alpha_masks"].tobytes())
            flips.update(details["flipped"])
    assert flips == {True, False} and len(seen_masks) > 4  # flips and different crops were exercised


def test_subsets_without_masks_get_ones_and_validation_batches_carry_masks(tmp_path):
    write_patterned(tmp_path / "a", tmp_path / "ma", [(64, 64)] * 4)
    write_image(str(tmp_path / "b" / "x.png"), 64, 64)
    (tmp_path / "b" / "x.txt").write_text("plain")
    text = config(tmp_path / "a", f'conditioning_data_dir = "{tmp_path / "ma"}"', "validation_split = 0.25")
    text += f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "b"}"\n'
    train, val = build(text, tmp_path)
    assert val.batch_fields == train.batch_fields and val.batch_fields[-1] == "alpha_masks"
    batches = [fields(train, i) for i in range(len(train))]
    plain = [batch["alpha_masks"] for batch, details in batches if details["image_key"][0].endswith("x.png")]
    assert len(plain) == 1 and plain[0].shape == (1, 1, 64, 64) and np.all(plain[0] == 1.0)
    assert not np.all(fields(val, 0)[0]["alpha_masks"] == 1.0)


# ----- the latent cache ----------------------------------------------------------------------------------------


def fake_vae(images):
    """8x8 average pooling, channels (r, g, b, mean)."""
    b, _, h, w = images.shape
    pooled = images.reshape(b, 3, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
    return np.concatenate([pooled, pooled.mean(axis=1, keepdims=True)], axis=1)


def test_alpha_mask_is_cached_with_the_latents_and_a_cache_without_it_is_not_valid(tmp_path):
    write_patterned(tmp_path / "img", None, [(64, 64), (64, 64)], alpha=True)
    alphas = {f"img{i}": np.asarray(Image.open(tmp_path / "img" / f"img{i}.png"))[:, :, 3] for i in range(2)}
    text = config(tmp_path / "img", "flip_aug = true")
    npz = {k: tmp_path / "img" / f"{k}_0064x0064_sdxl.npz" for k in alphas}

    # a cache written by a run without masks ...
    plain, _ = build(text, tmp_path, argv=())
    caching.cache_latents(plain, fake_vae, cache_to_disk=True)
    with np.load(npz["img0"]) as f:
        assert "alpha_mask" not in f.files
    assert not caching.is_latents_npz_valid(str(npz["img0"]), (64, 64), True, alpha_mask=True)
    assert caching.is_latents_npz_valid(str(npz["img0"]), (64, 64), True, alpha_mask=False)

    # ... is made again for --alpha_mask, with the mask under upstream's key
    uncached, _ = build(text, tmp_path, argv=("--alpha_mask",))
    cached, _ = build(text, tmp_path, argv=("--alpha_mask",))
    caching.cache_latents(cached, fake_vae, cache_to_disk=True)
    for key, alpha in alphas.items():
        with np.load(npz[key]) as f:
            assert f["alpha_mask"].dtype == np.float32 and f["alpha_mask"].shape == (64, 64)
            np.testing.assert_array_equal(f["alpha_mask"], alpha.astype(np.float32) / 255.0)
        assert caching.is_latents_npz_valid(str(npz[key]), (64, 64), True, alpha_mask=True)
    in_memory, _ = build(text, tmp_path, argv=("--alpha_mask",))
    caching.cache_latents(in_memory, fake_vae)

    # the cached runs' masks are the uncached run's, flips included
    flips = set()
    for epoch in (1, 2, 3):
        for group in (uncached, cached, in_memory):
            group.set_current_epoch(epoch)
        for index in range(len(uncached)):
            expected, details = fields(uncached, index)
            key = details["image_key"][0].rsplit("/", 1)[-1][:-4]
            alpha = alphas[key][:, ::-1] if details["flipped"][0] else alphas[key]
            np.testing.assert_array_equal(expected["alpha_masks"][0, 0], alpha.astype(np.float32) / 255.0)
            for group in (cached, in_memory):
                np.testing.assert_array_equal(fields(group, index)[0]["alpha_masks"], expected["alpha_masks"])
            flips.add(details["flipped"][0])
    assert flips == {True, False}


def test_conditioning_masks_with_cached_latents_equal_the_uncached_ones(tmp_path):
    write_patterned(tmp_path / "img", tmp_path / "masks", [(100, 70), (64, 64)])
    text = config(tmp_path / "img", f'conditioning_data_dir = "{tmp_path / "masks"}"\n  flip_aug = true')
    uncached, _ = build(text, tmp_path)
    cached, _ = build(text, tmp_path)
    caching.cache_latents(cached, fake_vae, cache_to_disk=True)
    for epoch in (1, 2, 3):
        uncached.set_current_epoch(epoch)
        cached.set_current_epoch(epoch)
        for index in range(len(uncached)):
            np.testing.assert_array_equal(fields(cached, index)[0]["alpha_masks"],
                                          fields(uncached, index)[0]["alpha_masks"])


# ----- finding masks, and the errors ---------------------------------------------------------------------------


def test_masks_are_matched_by_file_name_with_any_extension(tmp_path):
    write_patterned(tmp_path / "img", tmp_path / "unused", [(64, 64)] * 2)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "img0.jpg")
    Image.fromarray(np.full((64, 64), 0, np.uint8)).save(masks / "img1.webp", lossless=True)
    group, _ = build(config(tmp_path / "img", f'conditioning_data_dir = "{masks}"'), tmp_path)
    means = {}
    for index in range(len(group)):
        batch, details = fields(group, index)
        means[details["image_key"][0].rsplit("/", 1)[-1]] = float(batch["alpha_masks"].mean())
    assert means == {"img0.png": pytest.approx(1.0, abs=0.01), "img1.png": 0.0}


def test_mask_errors_name_the_files(tmp_path):
    write_patterned(tmp_path / "img", tmp_path / "masks", [(64, 64)] * 3)
    masks = tmp_path / "masks"
    subset = f'conditioning_data_dir = "{masks}"'
    text = config(tmp_path / "img", subset)

    (masks / "img1.png").unlink()
    message = error_of(text, tmp_path)
    assert "datasets[0].subsets[0]: no mask in conditioning_data_dir" in message
    assert str(tmp_path / "img" / "img1.png") in message and "img0" not in message and "img2" not in message
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "img1.png")

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(masks / "stray.png")
    message = error_of(text, tmp_path)
    assert "1 mask(s) in conditioning_data_dir" in message and str(masks / "stray.png") in message
    (masks / "stray.png").unlink()

    Image.fromarray(np.zeros((32, 64), np.uint8)).save(masks / "img2.png")
    message = error_of(text, tmp_path)
    assert f"mask {masks / 'img2.png'} is 64x32, its image {tmp_path / 'img' / 'img2.png'} is 64x64" in message

    assert "conditioning_data_dir (loss masks) needs --masked_loss" in error_of(text, tmp_path, argv=())
    assert "from conditioning_data_dir or from alpha_mask, not both" in error_of(
        config(tmp_path / "img", subset + "\n  alpha_mask = true"), tmp_path)
    assert "datasets[0].subsets[0].conditioning_data_dir: mask folder not found" in error_of(
        config(tmp_path / "img", f'conditioning_data_dir = "{tmp_path / "nowhere"}"'), tmp_path)
    assert "command line --conditioning_data_dir: masks are read from a dataset config" in error_of(
        config(tmp_path / "img"), tmp_path, argv=("--masked_loss", "--conditioning_data_dir", str(masks)))


def test_alpha_mask_from_the_command_line_and_the_config(tmp_path):
    write_patterned(tmp_path / "img", None, [(64, 64)], alpha=True)
    plain, _ = build(config(tmp_path / "img"), tmp_path, argv=("--masked_loss",))  # masked_loss, no masks: a warning
    assert "alpha_masks" not in plain.batch_fields
    from_cli, _ = build(config(tmp_path / "img"), tmp_path, argv=("--alpha_mask",))
    off_in_subset, _ = build(config(tmp_path / "img", "alpha_mask = false"), tmp_path, argv=("--alpha_mask",))
    assert from_cli.batch_fields[-1] == "alpha_masks" and "alpha_masks" not in off_in_subset.batch_fields
    misplaced = config(tmp_path / "img", extra_general="alpha_mask = true")
    assert "can only be set in [[datasets.subsets]]" in error_of(misplaced, tmp_path)


# ----- a real tiny run -----------------------------------------------------------------------------------------


def run_flags(ckpt, dataset_config, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", ckpt, "--dataset_config", str(dataset_config), "--network_module",
        "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
        "--max_train_steps", "3", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
        "--seed", "11", "--output_dir", str(output_dir), "--output_name", "lora", "--logging_dir",
        str(output_dir / "logs"), *extra,
    ]


def logged_losses(output_dir):
    losses = {}
    for event in tensorboard_events(output_dir):
        losses.update({event.step: v.simple_value for v in event.summary.value if v.tag == "loss/current"})
    return [losses[step] for step in sorted(losses)]


@pytest.mark.slow
def test_masked_run_with_all_ones_masks_trains_as_the_plain_run(tmp_path):
    ckpt, data_dir = write_training_workspace(tmp_path, num_images=2, num_repeats=1)
    image_dir = tmp_path / "data" / "1_sks"
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / f"img{i}.png")
    plain_toml, masked_toml = tmp_path / "plain.toml", tmp_path / "masked.toml"
    plain_toml.write_text(config(image_dir))
    masked_toml.write_text(config(image_dir, f'conditioning_data_dir = "{masks}"'))
    parser = sdxl_train_network.setup_parser()

    sdxl_train_network.SdxlNetworkTrainer().train(parser.parse_args(run_flags(ckpt, plain_toml, tmp_path / "plain")))
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    args = parser.parse_args(run_flags(ckpt, masked_toml, tmp_path / "masked", "--masked_loss"))
    trainer.train(args)

    assert trainer.compiled_step.cell.masked_loss is True
    # latents, hidden_state1, hidden_state2, pool2, 4 size fields, then the masks
    assert {shapes[8] for shapes in trainer.compiled_step.seen_shapes} == {(1, 1, 64, 64)}
    plain, masked = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "masked")
    assert len(plain) == 3 and np.all(np.isfinite(plain))
    np.testing.assert_allclose(masked, plain, rtol=1e-6, atol=0)
    plain_lora, masked_lora = (load_file(str(tmp_path / run / "lora.safetensors")) for run in ("plain", "masked"))
    assert masked_lora.keys() == plain_lora.keys()
    for key in plain_lora:
        np.testing.assert_allclose(masked_lora[key], plain_lora[key], rtol=0, atol=1e-6, err_msg=key)

    # the same compiled step with a zero mask: nothing left to learn from, so the loss is exactly 0
    (shapes,) = trainer.compiled_step.seen_shapes  # one bucket, one batch size
    batch = [np.zeros(shape, np.int32 if i in (5, 6, 7) else np.float32) for i, shape in enumerate(shapes[:9])]
    batch[4][:] = 1.0  # loss_weights
    batch[5][:] = batch[7][:] = 64  # original_sizes_hw, target_sizes_hw
    draws = NoiseSampler(args, seed=0).draw((1, 4, 8, 8))
    outputs = trainer.compiled_step(*(ms.Tensor(a) for a in (*batch, *draws)))
    assert float(outputs[0].asnumpy()) == 0.0
