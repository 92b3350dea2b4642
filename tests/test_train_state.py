"""--resume with a damaged state directory: one error naming the file, and nothing restored; leftovers of an
interrupted save are removed by the next run.

The state is written by train_state.save_state from a real tiny LoRA network, AdamW optimizer, LR scheduler and
noise sampler (no training step: the files' format does not depend on one, and no graph compiles). After saving,
every live value is changed, so a partial restore would show.
"""

import json
import os
import random
import shutil

import mindspore as ms
import numpy as np
import pytest

import sdxl_train_network
from library import lr_schedulers, optimizers, sdxl_model_util, train_state
from library.noise_sampling import NoiseSampler
from networks import lora
from tools.make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """(network, optimizer, lr_scheduler, noise_sampler, intact state directory)."""
    root = tmp_path_factory.mktemp("state")
    ckpt = str(root / "tiny.safetensors")
    make_tiny_checkpoint(ckpt, seed=3)
    te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(ckpt)
    network = lora.create_network(1.0, 4, 2, vae, [te1, te2], unet)
    network.apply_to([te1, te2], unet, False, True)
    args = sdxl_train_network.setup_parser().parse_args(
        ["--network_module", "networks.lora", "--learning_rate", "1e-3", "--lr_scheduler", "linear",
         "--max_train_steps", "10"])
    groups, _ = network.prepare_optimizer_params(None, None, args.learning_rate)
    _, _, optimizer = optimizers.get_optimizer(args, groups)
    scheduler = lr_schedulers.get_scheduler_fix(args, optimizer)
    sampler = NoiseSampler(args, seed=5)
    state_dir = str(root / "lora-step00000002-state")
    train_state.save_state(state_dir, network, optimizer, scheduler, sampler, epoch=0, step=2)
    return network, optimizer, scheduler, sampler, state_dir


def change_live_values(network, optimizer, scheduler, sampler):
    """Move every object away from what was saved, and return a snapshot of the new values."""
    rng = np.random.default_rng(1)
    for param in network.get_trainable_params():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    for param in optimizer.state_parameters().values():
        param.set_data(ms.Tensor(np.full(param.shape, 0.5), param.dtype))
    scheduler.step()
    sampler.rng.standard_normal(3)
    random.random()
    return snapshot(network, optimizer, scheduler, sampler)


def snapshot(network, optimizer, scheduler, sampler):
    return (network.lora_state_dict(), optimizer.state_dict(), scheduler.state_dict(), sampler.state_dict(),
            random.getstate())


def assert_same(before, after):
    for old, new in zip(before[:2], after[:2]):
        assert old.keys() == new.keys()
        for key in old:
            np.testing.assert_array_equal(old[key], new[key], err_msg=key)
    assert before[2:] == after[2:]


def load(training, state_dir):
    network, optimizer, scheduler, sampler, _ = training
    return train_state.load_state(state_dir, network, optimizer, scheduler, sampler, num_update_steps_per_epoch=4)


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def edit_json(path, change):
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def replace_tensor(path, key, value):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path)


def retype_first_tensor(path, dtype):
    from safetensors.numpy import load_file

    key, value = sorted(load_file(path).items())[0]
    replace_tensor(path, key, value.astype(dtype))


def first_down_key(path):
    from safetensors.numpy import load_file

    return sorted(k for k in load_file(path) if k.endswith("lora_down.weight"))[0]


DAMAGES = {
    "truncated model": ("model.safetensors", truncate, r"model\.safetensors: not a readable file"),
    "truncated optimizer": ("optimizer.safetensors", truncate, r"optimizer\.safetensors: not a readable file"),
    "model of another rank": (
        "model.safetensors",
        lambda p: replace_tensor(p, first_down_key(p), np.zeros((8, 64), np.float32)),
        r"model\.safetensors: lora_\w+\.lora_down\.weight has shape \(8, 64\), this run's is \(4, \d+\); use the same "
        r"network flags"),
    "optimizer with an integer moment": ("optimizer.safetensors", lambda p: retype_first_tensor(p, np.int64),
                                         r"optimizer\.safetensors: \S+ has dtype int64, this run's is float32"),
    "scheduler not JSON": ("scheduler.json", lambda p: write(p, ""), r"scheduler\.json: invalid JSON \(Expecting value"),
    "scheduler without base_lrs": ("scheduler.json", lambda p: edit_json(p, lambda v: v.pop("base_lrs")),
                                   r"scheduler\.json: missing key 'base_lrs'; use the same --lr_scheduler"),
    "random states a list": ("random_states.json", lambda p: write(p, "[]"),
                             r"random_states\.json: expected a JSON object, found a list of 0"),
    "python random state cut": ("random_states.json", lambda p: edit_json(p, lambda v: v["python"][1].pop()),
                                r"random_states\.json: expected a list of 625 at python\[1\], found a list of 624"),
    "noise sampler state of another generator": (
        "random_states.json",
        lambda p: edit_json(p, lambda v: v["noise_sampler"]["bit_generator"].update(bit_generator="MT19937")),
        r"random_states\.json: the noise sampler state cannot be restored"),
    "train state without the step": ("train_state.json", lambda p: edit_json(p, lambda v: v.pop("current_step")),
                                     r"train_state\.json: missing key 'current_step'"),
    "train state step a string": ("train_state.json", lambda p: edit_json(p, lambda v: v.update(current_step="2")),
                                  r"train_state\.json: expected a number at current_step, found str '2'"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_state_is_one_error_naming_the_file_and_restores_nothing(training, tmp_path, case):
    name, damage, message = DAMAGES[case]
    state_dir = str(tmp_path / "state")
    shutil.copytree(training[-1], state_dir)
    damage(os.path.join(state_dir, name))
    before = change_live_values(*training[:4])
    with pytest.raises(ValueError, match=r"^--resume \S+: " + message) as error:
        load(training, state_dir)
    assert "\n" not in str(error.value)
    assert_same(before, snapshot(*training[:4]))


def test_intact_state_restores_everything(training):
    network, optimizer, scheduler, sampler, state_dir = training
    before = change_live_values(network, optimizer, scheduler, sampler)
    assert load(training, state_dir) == (2, 0)
    restored = snapshot(network, optimizer, scheduler, sampler)
    # the values differ from the changed ones: the saved state came back (Adam moments were zeros, now not 0.5)
    assert all(np.all(value != 0.5) for value in restored[1].values() if value.size > 1)
    assert any(np.any(restored[0][key] != before[0][key]) for key in before[0])
    assert restored[2] != before[2] and restored[3] != before[3] and restored[4] != before[4]


def test_missing_file_is_named(training, tmp_path):
    state_dir = str(tmp_path / "state")
    shutil.copytree(training[-1], state_dir)
    os.remove(os.path.join(state_dir, "scheduler.json"))
    with pytest.raises(ValueError, match="not a complete training state, missing scheduler.json"):
        load(training, state_dir)


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path):
    out = tmp_path / "out"
    for name in ("lora.safetensors", "lora.safetensors.tmp", "lora-step00000004.safetensors.tmp", "notes.tmp"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"x")
    for name in ("lora-state", "lora-state.old", "lora-step00000004-state.tmp", "lora-step00000002-state.old"):
        (out / name).mkdir()
        (out / name / "train_state.json").write_text(name)
    train_state.remove_interrupted_saves(str(out))
    # a state moved aside whose replacement never arrived is put back; one with a replacement is removed
    assert sorted(os.listdir(out)) == ["lora-state", "lora-step00000002-state", "lora.safetensors", "notes.tmp"]
    assert (out / "lora-state" / "train_state.json").read_text() == "lora-state"
    assert (out / "lora-step00000002-state" / "train_state.json").read_text() == "lora-step00000002-state.old"


def test_training_removes_leftovers_at_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors.tmp").write_bytes(b"half a file")
    args = sdxl_train_network.setup_parser().parse_args(
        ["--network_module", "networks.lora", "--output_dir", str(out), "--train_data_dir", str(tmp_path / "none"),
         "--pretrained_model_name_or_path", "x.safetensors"])
    with pytest.raises(ValueError, match="not a folder"):  # the dataset fails next, before any model loads
        sdxl_train_network.SdxlNetworkTrainer().train(args)
    assert os.listdir(out) == []
