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
written under a temporary name and renamed, so a run killed mid-save leaves the previous state intact; the next
run removes such leftovers (`remove_interrupted_saves`).
"""

import json
import logging
import os
import random
import shutil
from typing import Optional

import numpy as np
from safetensors.numpy import load_file

from library import distributed
from library.sdxl_model_util import write_safetensors

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
RANDOM_STATES_FILE = "random_states.json"
TRAIN_STATE_FILE = "train_state.json"
STATE_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RANDOM_STATES_FILE, TRAIN_STATE_FILE)

logger = logging.getLogger(__name__)


def save_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, epoch: int, step: int,
               world_size: int = 1, is_main_process: bool = True):
    """Data parallel: every rank calls this (it gathers the ranks' noise streams); only the main process writes."""
    noise_states = distributed.gather_json(noise_sampler.state_dict()) if world_size > 1 else [noise_sampler.state_dict()]
    if not is_main_process:
        return
    tmp_dir = state_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    network.save_weights(os.path.join(tmp_dir, MODEL_FILE), None, {})
    write_safetensors(os.path.join(tmp_dir, OPTIMIZER_FILE), optimizer.state_dict())
    write_json(os.path.join(tmp_dir, SCHEDULER_FILE), lr_scheduler.state_dict())
    random_states = {"noise_sampler": noise_states[0], "python": list_state(random.getstate())}
    if world_size > 1:
        random_states["noise_sampler_by_rank"] = noise_states
    write_json(os.path.join(tmp_dir, RANDOM_STATES_FILE), random_states)
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
    loads the same directory and takes its own noise stream from it.

    Every file is read and checked against this run's network, optimizer, scheduler and noise sampler first, so a
    damaged or foreign state is one ValueError naming the file, and nothing has been changed."""
    state = read_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, world_size)
    network.load_weights(os.path.join(state_dir, MODEL_FILE))
    optimizer.load_state_dict(state[OPTIMIZER_FILE])
    lr_scheduler.load_state_dict(state[SCHEDULER_FILE])
    random_states = state[RANDOM_STATES_FILE]
    noise_sampler.load_state_dict(random_states["noise_sampler_by_rank"][rank] if world_size > 1 else random_states["noise_sampler"])
    random.setstate(tuple_state(random_states["python"]))
    global_step = int(state[TRAIN_STATE_FILE]["current_step"])
    return global_step, global_step // num_update_steps_per_epoch


def read_state(state_dir, network, optimizer, lr_scheduler, noise_sampler, world_size: int = 1) -> dict:
    """{file name: its parsed contents} of a state directory, each file validated; ValueError otherwise."""
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"--resume: state directory not found: {state_dir}")
    missing = [name for name in STATE_FILES if not os.path.isfile(os.path.join(state_dir, name))]
    if missing:
        raise ValueError(f"--resume {state_dir}: not a complete training state, missing {', '.join(missing)}")

    def fail(name, what):
        return ValueError(f"--resume {state_dir}: {name}: {what}")

    state = {}
    for name in STATE_FILES:
        path = os.path.join(state_dir, name)
        try:
            state[name] = load_file(path) if name.endswith(".safetensors") else read_json(path)
        except json.JSONDecodeError as e:
            raise fail(name, f"invalid JSON ({e})") from None
        except Exception as e:  # safetensors raises several types for truncated or corrupt files
            raise fail(name, f"not a readable file ({e})") from None

    train_state = state[TRAIN_STATE_FILE]
    problem = _structure_problem(train_state, {"current_epoch": 0, "current_step": 0})
    if problem:
        raise fail(TRAIN_STATE_FILE, problem)
    saved_world_size = train_state.get("world_size", 1)
    if saved_world_size != world_size:
        raise ValueError(
            f"--resume {state_dir}: the state was saved by a run with {saved_world_size} data-parallel process(es), "
            f"this run has {world_size}; resume with the same number of processes (msrun --worker_num)"
        )

    problem = _tensors_problem(state[MODEL_FILE], network.lora_state_dict())
    if problem:
        raise fail(MODEL_FILE, f"{problem}; use the same network flags as the saved run")
    problem = _tensors_problem(state[OPTIMIZER_FILE], optimizer.state_dict())
    if problem:
        raise fail(OPTIMIZER_FILE, f"{problem}; use the same --optimizer_type and network flags as the saved run")
    problem = _structure_problem(state[SCHEDULER_FILE], lr_scheduler.state_dict())
    if problem:
        raise fail(SCHEDULER_FILE, f"{problem}; use the same --lr_scheduler as the saved run")

    random_states = state[RANDOM_STATES_FILE]
    expected = {"noise_sampler": noise_sampler.state_dict(), "python": list_state(random.getstate())}
    if world_size > 1:
        expected["noise_sampler_by_rank"] = [noise_sampler.state_dict()] * world_size
    problem = _structure_problem(random_states, expected)
    if problem is None:
        problem = _random_states_problem(random_states, noise_sampler)
    if problem:
        raise fail(RANDOM_STATES_FILE, problem)
    return state


def _structure_problem(value, expected, where="") -> Optional[str]:
    """What differs between JSON `value` and the `expected` layout (same keys, list lengths and value kinds)."""
    at = f" at {where}" if where else ""
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return f"expected a JSON object{at}, found {_json_kind(value)}"
        missing = [key for key in expected if key not in value]
        if missing:
            return f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}{at}"
        for key, item in expected.items():
            problem = _structure_problem(value[key], item, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(expected, list):
        if not isinstance(value, list) or len(value) != len(expected):
            return f"expected a list of {len(expected)}{at}, found {_json_kind(value)}"
        for i, (item, expected_item) in enumerate(zip(value, expected)):
            problem = _structure_problem(item, expected_item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, bool) or expected is None:
        return None  # flags and optional values: any JSON value passes here, the loader interprets them
    if isinstance(expected, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"expected a number{at}, found {_json_kind(value)}"
    if isinstance(expected, str) and not isinstance(value, str):
        return f"expected a string{at}, found {_json_kind(value)}"
    return None


def _json_kind(value) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {value!r}"[:60]


def _random_states_problem(random_states, noise_sampler) -> Optional[str]:
    """Whether the saved RNG states can be set, tried on fresh generators (the live ones stay untouched)."""
    samplers = random_states.get("noise_sampler_by_rank") or [random_states["noise_sampler"]]
    for sampler_state in samplers:
        try:
            type(noise_sampler.rng.bit_generator)().state = sampler_state["bit_generator"]
        except (TypeError, ValueError, KeyError) as e:
            return f"the noise sampler state cannot be restored ({e})"
    try:
        random.Random().setstate(tuple_state(random_states["python"]))
    except (TypeError, ValueError) as e:
        return f"the Python random state cannot be restored ({e})"
    return None


def _tensors_problem(saved: dict, expected: dict) -> Optional[str]:
    """The first difference of keys, shapes or dtype families between the saved and this run's tensors."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        return (f"does not match this run's tensors: {len(missing)} missing, {len(unexpected)} unexpected "
                f"(first: {'missing' if missing else 'unexpected'} {first})")
    for key, value in expected.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(saved[key].shape)}, this run's is {tuple(value.shape)}"
        if _dtype_family(saved[key].dtype) != _dtype_family(value.dtype):
            return f"{key} has dtype {saved[key].dtype}, this run's is {value.dtype}"
    return None


def _dtype_family(dtype) -> str:
    """Floats of any width load into each other (fp16 <-> fp32 flags); any other dtype must match exactly."""
    dtype = np.dtype(dtype)
    return "float" if dtype.kind == "f" or dtype.name == "bfloat16" else dtype.name


def remove_interrupted_saves(output_dir):
    """Leftovers of a run killed while saving (see save_state and write_safetensors): `*.tmp` files and state
    folders are removed; a state folder moved aside as `<name>.old` whose replacement never arrived is put back."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.endswith(".safetensors.tmp") and os.path.isfile(path):
            os.remove(path)
        elif name.endswith("-state.tmp") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name.endswith("-state.old") and os.path.isdir(path):
            state_dir = path[: -len(".old")]
            if os.path.exists(state_dir):
                shutil.rmtree(path)
            else:
                os.replace(path, state_dir)
        else:
            continue
        logger.info("removed the leftover of an interrupted save: %s", path)


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
