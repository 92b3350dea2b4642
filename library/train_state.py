"""`--save_state` / `--resume`: everything needed to continue a run exactly where it stopped.

A state directory holds:
    model.safetensors      the network's LoRA weights (Kohya keys)
    optimizer.safetensors  the optimizer's state tensors (moments, step counters, lrs), by parameter name
    scheduler.json         the LR scheduler's state
    random_states.json     the host RNG streams (noise and timesteps are drawn on the host, see noise_sampling);
                           data parallel: also every rank's noise stream, "noise_sampler_by_rank"
    train_state.json       {"current_epoch": e, "current_step": s} as upstream, plus "world_size" (number of
                           data-parallel processes; a state resumes only with the same number)

Unlike upstream (where `global_step` restarts at 0 on resume unless --skip_until_initial_step is given),
resuming continues the step count, the LR schedule and the epoch position of the saved run. The directory is
written under a temporary name and renamed, so a run killed mid-save leaves the previous state intact.
"""

import json
import os
import random
import shutil

from safetensors.numpy import load_file

from library import distributed
from library.sdxl_model_util import write_safetensors

TRAIN_STATE_FILE = "train_state.json"


def save_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, epoch: int, step: int,
               world_size: int = 1, is_main_process: bool = True):
    """Data parallel: every rank calls this (it gathers the ranks' noise streams); only the main process writes."""
    noise_states = distributed.gather_json(noise_sampler.state_dict()) if world_size > 1 else [noise_sampler.state_dict()]
    if not is_main_process:
        return
    tmp_dir = state_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    network.save_weights(os.path.join(tmp_dir, "model.safetensors"), None, {})
    write_safetensors(os.path.join(tmp_dir, "optimizer.safetensors"), optimizer.state_dict())
    write_json(os.path.join(tmp_dir, "scheduler.json"), lr_scheduler.state_dict())
    random_states = {"noise_sampler": noise_states[0], "python": list_state(random.getstate())}
    if world_size > 1:
        random_states["noise_sampler_by_rank"] = noise_states
    write_json(os.path.join(tmp_dir, "random_states.json"), random_states)
    write_json(
        os.path.join(tmp_dir, TRAIN_STATE_FILE), {"current_epoch": epoch, "current_step": step, "world_size": world_size}
    )
    if os.path.isdir(state_dir):
        old_dir = state_dir.rstrip("/") + ".old"
        shutil.rmtree(old_dir, ignore_errors=True)
        os.replace(state_dir, old_dir)
        os.replace(tmp_dir, state_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, state_dir)


def load_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, num_update_steps_per_epoch: int,
               world_size: int = 1, rank: int = 0):
    """Restore a state directory; returns (global_step, epoch to continue in). Every rank of a data-parallel run
    loads the same directory and takes its own noise stream from it."""
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"--resume: state directory not found: {state_dir}")
    required = ("model.safetensors", "optimizer.safetensors", "scheduler.json", "random_states.json", TRAIN_STATE_FILE)
    missing = [name for name in required if not os.path.isfile(os.path.join(state_dir, name))]
    if missing:
        raise ValueError(f"--resume {state_dir}: not a complete training state, missing {', '.join(missing)}")
    train_state = read_json(os.path.join(state_dir, TRAIN_STATE_FILE))
    saved_world_size = int(train_state.get("world_size", 1))
    if saved_world_size != world_size:
        raise ValueError(
            f"--resume {state_dir}: the state was saved by a run with {saved_world_size} data-parallel process(es), "
            f"this run has {world_size}; resume with the same number of processes (msrun --worker_num)"
        )

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
    noise_sampler.load_state_dict(random_states["noise_sampler_by_rank"][rank] if world_size > 1 else random_states["noise_sampler"])
    random.setstate(tuple_state(random_states["python"]))
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
