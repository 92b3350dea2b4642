"""`--save_state` / `--resume`: everything needed to continue a run exactly where it stopped.

A state directory holds:
    model.safetensors      the network's LoRA weights (Kohya keys)
    optimizer.safetensors  the optimizer's state tensors (moments, step counters, lrs), by parameter name
    scheduler.json         the LR scheduler's state
    random_states.json     the host RNG streams (noise and timesteps are drawn on the host, see noise_sampling)
    train_state.json       {"current_epoch": e, "current_step": s} as upstream

Unlike upstream (where `global_step` restarts at 0 on resume unless --skip_until_initial_step is given),
resuming continues the step count, the LR schedule and the epoch position of the saved run. The directory is
written under a temporary name and renamed, so a run killed mid-save leaves the previous state intact.
"""

import json
import os
import random
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

TRAIN_STATE_FILE = "train_state.json"


def save_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, epoch: int, step: int):
    tmp_dir = state_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    network.save_weights(os.path.join(tmp_dir, "model.safetensors"), None, {})
    tensors = {name: np.ascontiguousarray(value) for name, value in optimizer.state_dict().items()}
    save_file(tensors, os.path.join(tmp_dir, "optimizer.safetensors"))
    write_json(os.path.join(tmp_dir, "scheduler.json"), lr_scheduler.state_dict())
    write_json(
        os.path.join(tmp_dir, "random_states.json"),
        {"noise_sampler": noise_sampler.state_dict(), "python": list_state(random.getstate())},
    )
    write_json(os.path.join(tmp_dir, TRAIN_STATE_FILE), {"current_epoch": epoch, "current_step": step})
    if os.path.isdir(state_dir):
        old_dir = state_dir.rstrip("/") + ".old"
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(state_dir, old_dir)
        os.replace(tmp_dir, state_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, state_dir)


def load_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, num_update_steps_per_epoch: int):
    """Restore a state directory; returns (global_step, epoch to continue in)."""
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"--resume: state directory not found: {state_dir}")
    required = ("model.safetensors", "optimizer.safetensors", "scheduler.json", "random_states.json", TRAIN_STATE_FILE)
    missing = [name for name in required if not os.path.isfile(os.path.join(state_dir, name))]
    if missing:
        raise ValueError(f"--resume {state_dir}: not a complete training state, missing {', '.join(missing)}")

    missing_keys, unexpected_keys = network.load_weights(os.path.join(state_dir, "model.safetensors"))
    if missing_keys or unexpected_keys:
        raise ValueError(
            f"--resume {state_dir}: the saved network does not match this run's network "
            f"(missing {len(missing_keys)}, unexpected {len(unexpected_keys)} keys); use the same network flags"
        )
    try:
        optimizer.load_state_dict(load_file(os.path.join(state_dir, "optimizer.safetensors")))
    except ValueError as e:
        raise ValueError(f"--resume {state_dir}: {e}; use the same --optimizer_type and network flags") from e
    lr_scheduler.load_state_dict(read_json(os.path.join(state_dir, "scheduler.json")))
    random_states = read_json(os.path.join(state_dir, "random_states.json"))
    noise_sampler.load_state_dict(random_states["noise_sampler"])
    random.setstate(tuple_state(random_states["python"]))
    train_state = read_json(os.path.join(state_dir, TRAIN_STATE_FILE))
    global_step = int(train_state["current_step"])
    return global_step, global_step // num_update_steps_per_epoch


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def list_state(state):
    """random.getstate() as JSON-friendly lists."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def tuple_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss
