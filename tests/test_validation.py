"""Validation loss: the train/validation split, the fixed noise, the forward-only graph, the schedule and logs."""

import argparse
import math
import random

import mindspore as ms
import numpy as np
import pytest

import sdxl_train_network
import train_network
from library import config_util, custom_train_functions, optimizers, train_util, validation
from library.custom_train_functions import ddpm_alphas_cumprod
from library.datasets import split_train_val
from library.image_loading import glob_images
from library.noise_sampling import FixedTimestepNoise, NoiseSampler
from library.sdxl_model_util import VAE_SCALE_FACTOR
from tests.dataset_helpers import FakeTokenizeStrategy, write_image, write_text
from train_helpers import write_training_workspace


# ----- the split ---------------------------------------------------------------------------------------------


def parse_dataset_args(argv=()):
    parser = argparse.ArgumentParser()
    train_util.add_dataset_arguments(parser, True, True, True)
    config_util.add_config_arguments(parser)
    validation.add_validation_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(list(argv))


def image_folder(root, name, count):
    folder = root / name
    for k in range(count):
        write_image(str(folder / f"img{k:02d}.png"), 16, 16, seed=k)
        write_text(folder / f"img{k:02d}.txt", f"caption {k}")
    return folder


def groups_for(tmp_path, dataset_lines="", subsets=None, argv=()):
    subsets = subsets or [(image_folder(tmp_path, "imgs", 10), "")]
    text = '[general]\nresolution = 16\ncaption_extension = ".txt"\n[[datasets]]\n' + dataset_lines + "\n"
    for folder, extra in subsets:
        text += f'  [[datasets.subsets]]\n  image_dir = "{folder}"\n  {extra}\n'
    (tmp_path / "config.toml").write_text(text)
    args = parse_dataset_args(["--dataset_config", str(tmp_path / "config.toml"), *argv])
    return config_util.build_dataset_groups(args, FakeTokenizeStrategy())


def keys(group):
    return [info.image_key for _, info in group.image_infos()] if group is not None else []


def upstream_split(paths, split, seed):
    """What upstream's split_train_val returns: the global `random` reseeded, shuffled, cut (its own rounding)."""
    state = random.getstate()
    random.seed(seed)
    shuffled = list(paths)
    random.shuffle(shuffled)
    random.setstate(state)
    return shuffled[: math.ceil(len(shuffled) * (1 - split))], shuffled[len(shuffled) - round(len(shuffled) * split):]


def test_split_matches_upstreams_test_vector():
    # upstream's tests/test_validation.py: seed 1234, split 0.2 of 7 paths
    paths = [f"path{i}" for i in range(1, 8)]
    assert split_train_val(paths, True, 0.2, 1234) == ["path2", "path3", "path6", "path5", "path1", "path4"]
    assert split_train_val(paths, False, 0.2, 1234) == ["path7"]


@pytest.mark.parametrize("n, split", [(10, 0.3), (7, 0.2), (10, 0.15), (10, 0.7), (3, 0.5), (25, 0.44), (4, 1.0)])
def test_split_is_upstreams_validation_part_and_a_disjoint_training_part(n, split):
    items = [f"i{k}" for k in range(n)]
    train, val = split_train_val(items, True, split, 77), split_train_val(items, False, split, 77)
    up_train, up_val = upstream_split(items, split, 77)
    assert val == up_val and len(val) == round(n * split)
    assert not set(train) & set(val) and set(train) | set(val) == set(items)
    # upstream's training part is the same, or one longer when its ceil() takes the first validation item too
    assert train == up_train[: len(train)] and len(up_train) - len(train) in (0, 1)
    if len(up_train) + len(up_val) > n:
        assert up_train[-1] == val[0]


def test_split_uses_its_own_generator():
    random.seed(5)
    state = random.getstate()
    split_train_val(list(range(10)), True, 0.3, 1)
    assert random.getstate() == state


def test_validation_group_is_the_seeded_split_and_never_in_training(tmp_path):
    train, val = groups_for(tmp_path, "validation_split = 0.3\nvalidation_seed = 5")
    paths = sorted(keys(train) + keys(val))
    assert len(paths) == 10
    up_train, up_val = upstream_split(paths, 0.3, 5)
    assert keys(val) == up_val and keys(train) == up_train  # no overlap case: identical to upstream, in order
    assert not set(keys(train)) & set(keys(val))
    assert val.num_train_images == 3 and train.num_train_images == 7
    assert type(val) is type(train) and val.batch_fields == train.batch_fields
    # a group like the training one: buckets and batches work
    val.set_current_epoch(1)
    arrays, details = val.get_batch(0)
    assert arrays[0].shape == (1, 3, 16, 16) and details["image_key"][0] in up_val


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    first = groups_for(tmp_path / "a", "validation_split = 0.3\nvalidation_seed = 5")
    again = groups_for(tmp_path / "b", "validation_split = 0.3\nvalidation_seed = 5")
    other = groups_for(tmp_path / "c", "validation_split = 0.3\nvalidation_seed = 6")
    names = lambda g: sorted(k.rsplit("/", 1)[1] for k in keys(g))  # noqa: E731
    assert names(first[1]) == names(again[1])
    assert names(first[1]) != names(other[1])


def test_validation_seed_defaults_to_the_run_seed_and_the_flags_layer_as_other_options(tmp_path):
    folder = image_folder(tmp_path, "imgs", 10)
    paths = glob_images(str(folder))  # the order the dataset lists a folder in, as upstream's glob_images

    def validation_part(dataset_lines, *argv):
        return keys(groups_for(tmp_path, dataset_lines, [(folder, "")], argv)[1])

    assert validation_part("", "--validation_split", "0.3", "--seed", "3") == upstream_split(paths, 0.3, 3)[1]
    # --validation_seed wins over --seed, and the dataset's key over the flag
    argv = ("--validation_split", "0.3", "--seed", "3", "--validation_seed", "9")
    assert validation_part("", *argv) == upstream_split(paths, 0.3, 9)[1]
    assert validation_part("validation_seed = 4", *argv) == upstream_split(paths, 0.3, 4)[1]
    # and the dataset's validation_split over --validation_split
    assert len(validation_part("validation_split = 0.5", *argv)) == 5


def test_each_subset_is_split_and_reg_images_never_validate(tmp_path):
    a = image_folder(tmp_path, "a", 10)
    b = image_folder(tmp_path, "b", 5)
    reg = image_folder(tmp_path, "reg", 4)
    train, val = groups_for(tmp_path, "validation_split = 0.2\nvalidation_seed = 1",
                            [(a, "num_repeats = 3"), (b, ""), (reg, "is_reg = true")])
    in_val = keys(val)
    assert sum("/a/" in k for k in in_val) == 2 and sum("/b/" in k for k in in_val) == 1
    assert not any("/reg/" in k for k in in_val)
    assert not set(in_val) & set(keys(train))
    (val_dataset,) = val.datasets
    assert all(info.num_repeats == 1 for info in val_dataset.image_data.values())  # repeats are for training
    assert val.num_reg_images == 0 and train.num_train_images == 8 * 3 + 4
    assert sum("/reg/" in k for k in keys(train)) == 4


def test_no_validation_group_without_a_split_or_when_it_rounds_to_nothing(tmp_path):
    assert groups_for(tmp_path / "a")[1] is None
    folder = image_folder(tmp_path, "few", 3)
    train, val = groups_for(tmp_path, "validation_split = 0.1", [(folder, "")])  # round(0.3) = 0
    assert val is None and len(keys(train)) == 3


# ----- arguments, timesteps, schedule, logs ------------------------------------------------------------------


def test_arguments_and_defaults():
    parser = argparse.ArgumentParser()
    validation.add_validation_arguments(parser)
    args = parser.parse_args([])
    assert vars(args) == {"validation_seed": None, "validation_split": 0.0, "validate_every_n_steps": None,
                          "validate_every_n_epochs": None, "max_validation_steps": None}
    validation.verify_validation_args(args)
    for flag in ("--validate_every_n_steps", "--validate_every_n_epochs", "--max_validation_steps"):
        with pytest.raises(ValueError, match=flag):
            validation.verify_validation_args(parser.parse_args([flag, "0"]))
    with pytest.raises(ValueError, match="--validation_split"):
        validation.verify_validation_args(parser.parse_args(["--validation_split", "1.5"]))


def test_seed_timesteps_and_metadata():
    args = argparse.Namespace(min_timestep=None, max_timestep=None, validation_seed=None, seed=12,
                              validation_split=0.25, max_validation_steps=None, validate_every_n_epochs=2,
                              validate_every_n_steps=None)
    assert validation.validation_timesteps(args) == [200, 400, 600, 800]
    assert validation.validation_seed(args) == 12
    args.validation_seed = 0
    assert validation.validation_seed(args) == 0  # 0 is a seed, not "unset"
    args.min_timestep, args.max_timestep = 100, 555
    assert validation.validation_timesteps(args) == [int(t) for t in np.linspace(100, 555, 6)[1:-1]]
    assert validation.validation_timesteps(args) == [191, 282, 373, 464]
    assert validation.validation_metadata(args, None) == {
        "ss_num_validation_images": "0", "ss_validation_seed": "0", "ss_validation_split": "0.25",
        "ss_max_validation_steps": "None", "ss_validate_every_n_epochs": "2", "ss_validate_every_n_steps": "None",
    }


@pytest.mark.parametrize("step, every_n, num_steps, expected", [
    (1, None, 5, False), (10, None, 5, False),  # no step validation unless asked for
    (3, 3, 5, True), (6, 3, 5, True), (4, 3, 5, False), (1, 1, 5, True),
    (3, 3, 0, False),  # nothing to evaluate
])
def test_step_schedule(step, every_n, num_steps, expected):
    assert validation.should_validate_step(step, every_n, num_steps) is expected
    assert validation.should_validate(step, validate_every_n_steps=every_n, num_steps=num_steps) is expected


@pytest.mark.parametrize("epoch, every_n, num_steps, expected", [
    (0, None, 5, True), (7, None, 5, True),  # every epoch by default
    (0, 2, 5, False), (1, 2, 5, True), (2, 2, 5, False), (3, 2, 5, True), (0, 1, 5, True),
    (1, None, 0, False),
])
def test_epoch_schedule(epoch, every_n, num_steps, expected):
    assert validation.should_validate_epoch(epoch, every_n, num_steps) is expected
    assert validation.should_validate(epoch=epoch, validate_every_n_epochs=every_n, num_steps=num_steps) is expected


def test_should_validate_needs_exactly_one_of_step_and_epoch():
    with pytest.raises(ValueError):
        validation.should_validate()
    with pytest.raises(ValueError):
        validation.should_validate(1, 0)


def test_logged_values_follow_upstreams_recorders():
    tracker = validation.ValidationLossTracker()
    # epoch 0: two step evaluations of 2 losses each accumulate (upstream appends everything in epoch 0)
    assert tracker.step_logs([1.0, 2.0], epoch=0, train_average=0.5) == {
        "loss/validation/step_average": 1.5, "loss/validation/step_divergence": 1.0}
    logs = tracker.step_logs([3.0, 6.0], epoch=0, train_average=1.0)
    assert logs == {"loss/validation/step_average": 3.0, "loss/validation/step_divergence": 2.0}
    # epoch 1: a step evaluation overwrites slots 0 and 1; slots 2 and 3 keep 3.0 and 6.0
    logs = tracker.step_logs([0.0, 2.0], epoch=1, train_average=3.0)
    assert logs == {"loss/validation/step_average": 11.0 / 4, "loss/validation/step_divergence": 11.0 / 4 - 3.0}
    # epoch evaluations have their own recorder: the latest evaluation's mean from epoch 1 on
    assert tracker.epoch_logs([2.0, 4.0], epoch=0, train_average=1.0) == {
        "loss/validation/epoch_average": 3.0, "loss/validation/epoch_divergence": 2.0}
    assert tracker.epoch_logs([1.0, 1.0], epoch=1, train_average=2.0) == {
        "loss/validation/epoch_average": 1.0, "loss/validation/epoch_divergence": -1.0}
    # a run resumed into a later epoch starts empty and fills slots in order
    resumed = validation.ValidationLossTracker()
    assert resumed.epoch_logs([4.0, 2.0], epoch=3, train_average=0.0)["loss/validation/epoch_average"] == 3.0


def test_batch_indices_per_rank_and_max_steps():
    assert list(validation.validation_batch_indices(5, None)) == [0, 1, 2, 3, 4]
    assert list(validation.validation_batch_indices(5, 2)) == [0, 1]
    assert list(validation.validation_batch_indices(5, None, rank=1, world_size=2)) == [1, 3]
    assert list(validation.validation_batch_indices(5, 1, rank=1, world_size=2)) == [1]
    assert list(validation.validation_batch_indices(1, None, rank=1, world_size=2)) == []


# ----- fixed noise -------------------------------------------------------------------------------------------


def noise_args(*extra):
    parser = argparse.ArgumentParser()
    custom_train_functions.add_noise_and_loss_arguments(parser)
    return parser.parse_args(list(extra))


FLAG_SETS = [(), ("--noise_offset", "0.1", "--noise_offset_random_strength", "--multires_noise_iterations", "3",
                  "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength")]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_fixed_noise_has_the_train_layout_and_the_given_timestep(flags):
    args = noise_args(*flags)
    fixed = FixedTimestepNoise(args, seed=3)
    train_draws = NoiseSampler(args, seed=3).draw((2, 4, 16, 8))
    draws = fixed.draw((2, 4, 16, 8), batch_index=0, timestep=400)
    assert fixed.fields == NoiseSampler(args, 3).fields and fixed.per_sample == NoiseSampler(args, 3).per_sample
    assert [(d.shape, d.dtype) for d in draws] == [(d.shape, d.dtype) for d in train_draws]
    np.testing.assert_array_equal(draws[1], np.array([400, 400], np.int32))


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_fixed_noise_is_a_function_of_seed_batch_and_timestep(flags):
    args = noise_args(*flags)
    shape = (2, 4, 8, 8)
    reference = FixedTimestepNoise(args, seed=3).draw(shape, 1, 600)
    fixed = FixedTimestepNoise(args, seed=3)
    fixed.draw(shape, 0, 200)  # what was drawn before does not matter
    np.random.seed(99)
    random.seed(99)
    ms.set_seed(99)
    again = fixed.draw(shape, 1, 600)
    for a, b in zip(reference, again):
        np.testing.assert_array_equal(a, b)
    for other in (FixedTimestepNoise(args, seed=4).draw(shape, 1, 600), fixed.draw(shape, 2, 600),
                  fixed.draw(shape, 1, 800)):
        assert not np.array_equal(other[0], reference[0])


def test_fixed_noise_touches_no_other_random_stream():
    args = noise_args("--noise_offset", "0.1", "--noise_offset_random_strength")
    uninterrupted, interrupted = NoiseSampler(args, seed=5), NoiseSampler(args, seed=5)
    expected = [uninterrupted.draw((1, 4, 8, 8)) for _ in range(2)]
    np_state, py_state = np.random.get_state(), random.getstate()
    first = interrupted.draw((1, 4, 8, 8))
    FixedTimestepNoise(args, seed=5).draw((1, 4, 8, 8), 0, 200)  # same seed as the training stream
    second = interrupted.draw((1, 4, 8, 8))
    for want, got in zip(expected, [first, second]):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])
    # and the fixed draws differ from the training draws of the same seed
    assert not np.array_equal(FixedTimestepNoise(args, seed=5).draw((1, 4, 8, 8), 0, 0)[0], expected[0][0])


def test_run_validation_restores_mixed_train_flags_after_an_error():
    class Net(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.a, self.b = ms.nn.Dense(2, 2), ms.nn.Dense(2, 2)

    class Group:
        batch_fields = ("latents",)

        def __len__(self):
            return 1

        def get_batch(self, index):
            return (np.zeros((1, 4, 8, 8), np.float32),), {}

        def latent_shape(self, batch):
            return batch[0].shape

    seen = []

    def failing_step(*inputs):
        seen.append([net.training, net.a.training, net.b.training])
        raise RuntimeError("boom")

    net = Net()
    net.set_train(True)
    net.b.set_train(False)
    net.c = ms.nn.Dense(2, 2)  # never set: not training, yet in the "train" phase
    before = [(cell.training, cell.phase) for cell in (net, net.a, net.b, net.c)]
    with pytest.raises(RuntimeError, match="boom"):
        validation.run_validation(failing_step, Group(), FixedTimestepNoise(noise_args(), 1), [200], net)
    assert seen == [[False, False, False]]  # evaluated in eval mode
    assert [(cell.training, cell.phase) for cell in (net, net.a, net.b, net.c)] == before
    assert before == [(True, "train"), (True, "train"), (False, "predict"), (False, "train")]


# ----- the compiled validation step on the tiny model -------------------------------------------------------


def add_bucket_images(folder):
    """Three 96x32 images beside the 64x64 ones: a second bucket (96, 32) for the dynamic-shape graph."""
    for i in range(3):
        write_image(str(folder / f"wide{i}.png"), 96, 32, seed=50 + i)
        write_text(folder / f"wide{i}.txt", f"sks wide picture {i}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with a UNet LoRA (non-zero weights, dropout 0.5), its train step, cached groups and one
    Validation object: the validation graph compiles once here, for every test below."""
    root = tmp_path_factory.mktemp("validation")
    ckpt, data_dir = write_training_workspace(root, num_images=6, num_repeats=1)
    add_bucket_images(root / "data" / "1_sks")
    parser = sdxl_train_network.setup_parser()  # the trainer's flags, the validation ones included
    args = parser.parse_args([
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data_dir, "--resolution", "64",
        "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "4", "--network_dropout", "0.5", "--cache_latents", "--cache_text_encoder_outputs",
        "--network_train_unet_only", "--seed", "11", "--validation_split", "0.34", "--validation_seed", "2",
        "--train_batch_size", "2", "--max_train_steps", "10", "--output_dir", str(root / "out"),
    ])
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    config_util.prepare_dataset_args(args)
    tokenize_strategy = trainer.load_tokenizer(args)
    train_group, val_group = config_util.build_dataset_groups(args, tokenize_strategy)
    train_network.configure_mindspore(args)
    (te1, te2), vae, unet = trainer.load_target_model(args, ms.float32)
    for group in (train_group, val_group):
        trainer.cache_latents(args, vae, group)
        trainer.cache_text_encoder_outputs(args, (te1, te2), group, tokenize_strategy)
    network = trainer.create_network(args, train_network.import_network_module("networks.lora"), {}, (te1, te2),
                                     vae, unet)
    rng = np.random.default_rng(0)
    for param in network.get_trainable_params():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    optimizers.resolve_optimizer_type(args)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    _, _, optimizer = optimizers.get_optimizer(args, groups)
    train_step = trainer.build_train_step(args, network, optimizer, (te1, te2), vae, unet, train_group, ms.float32)
    network.set_train(True)
    checker = validation.Validation.create(args, train_step, val_group, network, show_progress=False)
    first = checker.run()
    return argparse.Namespace(args=args, unet=unet, network=network, group=val_group, train_group=train_group,
                              validation=checker, first=first)


def test_the_tiny_validation_group_has_two_shapes(tiny):
    tiny.group.set_current_epoch(validation.VALIDATION_EPOCH)
    shapes = {tiny.group.get_batch(i)[0][0].shape for i in range(len(tiny.group))}
    assert len(tiny.group) >= 2 and len(shapes) >= 2
    assert not set(keys(tiny.group)) & set(keys(tiny.train_group))


def test_same_weights_give_the_same_loss_in_one_compile(tiny):
    assert len(tiny.first.losses) == len(tiny.group) * 4
    weights = {k: v.copy() for k, v in tiny.network.lora_state_dict().items()}
    np.random.seed(1)
    random.seed(1)
    ms.set_seed(1)
    np_state, py_state = np.random.get_state(), random.getstate()
    again = tiny.validation.run()
    assert again.losses == tiny.first.losses  # dropout is off, the noise fixed
    assert tiny.validation.step.num_compiles == 1  # one graph for both buckets and batch sizes
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])
    after = tiny.network.lora_state_dict()
    assert all(np.array_equal(weights[k], after[k]) for k in weights)  # forward only: nothing was updated
    assert all(cell.training for _, cell in tiny.network.cells_and_names())  # train mode restored


def test_max_steps_takes_the_first_batches(tiny):
    v = tiny.validation
    part = validation.run_validation(v.step, tiny.group, v.noise, v.timesteps, tiny.network, max_steps=1)
    assert part.losses == tiny.first.losses[:4]


def test_loss_equals_a_numpy_mse_over_the_unet_output(tiny):
    """The epsilon-prediction MSE from the UNet called in PyNative on noisy latents made in numpy."""
    alphas_cumprod = ddpm_alphas_cumprod()
    expected = []
    ms.set_context(mode=ms.PYNATIVE_MODE)
    tiny.network.set_train(False)
    try:
        tiny.group.set_current_epoch(validation.VALIDATION_EPOCH)
        for index in range(len(tiny.group)):
            batch, _ = tiny.group.get_batch(index)
            latents, h1, h2, pool2, loss_weights, original, crop, target = batch
            latents = latents * VAE_SCALE_FACTOR
            for t in tiny.validation.timesteps:
                noise = tiny.validation.noise.draw(latents.shape, index, t)[0]
                a = alphas_cumprod[t]
                noisy = (np.sqrt(a) * latents + np.sqrt(1 - a) * noise).astype(np.float32)
                pred = sdxl_train_network.sdxl_call_unet(
                    tiny.unet, ms.Tensor(noisy), ms.Tensor(np.full(len(latents), t, np.int32)),
                    (ms.Tensor(h1), ms.Tensor(h2), ms.Tensor(pool2)), ms.Tensor(original), ms.Tensor(crop),
                    ms.Tensor(target), ms.float32,
                ).asnumpy()
                per_sample = ((pred - noise) ** 2).mean(axis=(1, 2, 3)) * loss_weights
                expected.append(float(per_sample.mean()))
    finally:
        tiny.network.set_train(True)
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(tiny.first.losses, expected, rtol=2e-4, atol=1e-6)


def test_validation_logs_on_schedule(tiny):
    v = tiny.validation
    v.validate_every_n_steps, v.validate_every_n_epochs = 2, None
    try:
        assert v.after_step(1, 0, 0.5) is None
        logs = v.after_step(2, 0, 0.5)
        mean = float(np.mean(tiny.first.losses))
        assert logs == pytest.approx({"loss/validation/step_average": mean,
                                      "loss/validation/step_divergence": mean - 0.5})
        logs = v.after_epoch(0, 1.0)
        assert logs == pytest.approx({"loss/validation/epoch_average": mean,
                                      "loss/validation/epoch_divergence": mean - 1.0})
    finally:
        v.validate_every_n_steps = tiny.args.validate_every_n_steps
