"""Data-parallel training under msrun (library/distributed.py): sharding rules, resume rules, and a real 2-worker
run on CPU over loopback compared with a single-process run of the same global batch."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from library import distributed, train_state
from library.noise_sampling import NoiseSampler
from train_helpers import write_training_workspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "msrun_train_worker.py")


# ----- fast: rules without a launch ----------------------------------------------------------------------------


def test_msrun_detection(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    assert not distributed.launched_by_msrun()
    for role in ("MS_WORKER", "MS_SCHED"):
        monkeypatch.setenv("MS_ROLE", role)
        assert distributed.launched_by_msrun()
    monkeypatch.setenv("MS_ROLE", "MS_PSERVER")
    assert not distributed.launched_by_msrun()
    # not launched: a single process, and the collectives are no-ops
    assert distributed.get_state() == distributed.DistributedState(rank=0, world_size=1)
    assert distributed.get_state().is_main_process
    distributed.barrier()
    assert distributed.gather_json({"a": 1}) == [{"a": 1}]


def test_rank_batch_indices_drop_the_uneven_remainder():
    # 7 batches on 3 ranks: 2 each; batch 6 is dropped so that no rank has an extra step
    assert distributed.batches_per_rank(7, 3) == 2
    shards = [list(distributed.rank_batch_indices(7, 3, r)) for r in range(3)]
    assert shards == [[0, 3], [1, 4], [2, 5]]
    assert list(distributed.rank_batch_indices(5, 1, 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="2 data-parallel processes but only 1 batches per epoch"):
        distributed.batches_per_rank(1, 2)


class _FakeNetwork:
    def save_weights(self, path, dtype, metadata):
        from library.sdxl_model_util import write_safetensors

        write_safetensors(path, {"w": np.zeros(2, np.float32)})


class _FakeStateful:
    def state_dict(self):
        return {"m": np.zeros(2, np.float32)}


class _FakeScheduler:
    def state_dict(self):
        return {"last_epoch": 3}


def _args(**kw):
    import types

    base = dict(min_timestep=None, max_timestep=None, noise_offset=None, noise_offset_random_strength=False,
                multires_noise_iterations=None, ip_noise_gamma=None, ip_noise_gamma_random_strength=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_state_records_world_size_and_rejects_another(tmp_path):
    state_dir = str(tmp_path / "state")
    sampler = NoiseSampler(_args(), seed=3)
    train_state.save_state(state_dir, _FakeNetwork(), _FakeStateful(), _FakeScheduler(), sampler, epoch=1, step=5)
    with open(os.path.join(state_dir, train_state.TRAIN_STATE_FILE)) as f:
        assert json.load(f) == {"current_epoch": 1, "current_step": 5, "world_size": 1}
    # a state of a 2-process run, resumed by one process (or the reverse): an error that says so
    with open(os.path.join(state_dir, train_state.TRAIN_STATE_FILE), "w") as f:
        json.dump({"current_epoch": 1, "current_step": 5, "world_size": 2}, f)
    with pytest.raises(ValueError, match=r"saved by a run with 2 data-parallel process\(es\), this run has 1; resume "
                                         r"with the same number of processes"):
        train_state.load_state(state_dir, None, None, None, sampler, 1)
    with pytest.raises(ValueError, match="saved by a run with 2 .* this run has 4"):
        train_state.load_state(state_dir, None, None, None, sampler, 1, world_size=4, rank=3)


def test_non_main_process_writes_no_state(tmp_path):
    state_dir = str(tmp_path / "state")
    sampler = NoiseSampler(_args(), seed=3)
    train_state.save_state(state_dir, _FakeNetwork(), _FakeStateful(), _FakeScheduler(), sampler, epoch=1, step=5,
                           is_main_process=False)
    assert not os.path.exists(state_dir) and os.listdir(tmp_path) == []


# ----- slow: a real 2-worker msrun launch -----------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log_path, env):
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_bounded(proc, deadline):
    """Wait until `deadline` (time.time()); past it kill proc and all its descendants (msrun starts its workers in
    their own sessions, so killing msrun alone would leave them waiting in an all-reduce)."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3 steps on the same 2 images: 2 msrun workers x batch 1, and 1 process x batch 2."""
    root = tmp_path_factory.mktemp("msrun")
    ckpt, data_dir = write_training_workspace(root, num_images=2, num_repeats=1)
    image_dir = root / "data" / "1_sks"

    # SGD, not AdamW: Adam's update ignores the gradient's scale, so a sum instead of a mean would go unseen
    flags = [
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data_dir, "--resolution", "64",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "4", "--network_train_unet_only", "--cache_latents", "--cache_latents_to_disk",
        "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", "--optimizer_type", "SGDNesterov",
        "--learning_rate", "0.05", "--max_train_steps", "3", "--seed", "11", "--output_name", "lora",
        "--min_timestep", "100", "--max_timestep", "900",
    ]
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # msrun runs `python`
    env["PYTHONPATH"] = REPO
    env.setdefault("GLOG_v", "3")

    # The 2-worker run writes the disk caches (split across ranks); the single run starts once they exist and reads
    # them, so both train on the same latents. The two runs compile at the same time (one process compiles on
    # one core): about 3 minutes on 2 cores, instead of about 5 one after the other.
    started = time.time()
    deadline = started + 480
    msrun = [
        sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num=2", "--local_worker_num=2",
        "--master_addr=127.0.0.1", f"--master_port={free_loopback_port()}", "--join=True",
        f"--log_dir={root / 'msrun_logs'}", "--cluster_time_out=120",
        WORKER, str(root / "dump_multi"), *flags, "--output_dir", str(root / "out_multi"), "--train_batch_size", "1",
        "--save_state_on_train_end",
    ]
    multi = start(msrun, root / "msrun.txt", env)
    caches = [image_dir / f"img{i}{suffix}" for i in range(2) for suffix in ("_0064x0064_sdxl.npz", "_te_outputs.npz")]
    while not all(path.exists() for path in caches) and multi.poll() is None and time.time() < deadline:
        time.sleep(1)
    # the single run gets no GLOG_v / TRANSFORMERS_VERBOSITY: the script must keep its console quiet by itself
    quiet_by_itself = {k: v for k, v in env.items() if k not in ("GLOG_v", "TRANSFORMERS_VERBOSITY")}
    single = start([sys.executable, WORKER, str(root / "dump_single"), *flags, "--output_dir", str(root / "out_single"),
                    "--train_batch_size", "2"], root / "single.txt", quiet_by_itself)
    rc_multi = wait_bounded(multi, deadline)
    multi_seconds = time.time() - started
    rc_single = wait_bounded(single, deadline)
    print(f"msrun 2 workers: {multi_seconds:.0f} s, both runs: {time.time() - started:.0f} s")
    assert rc_multi == 0, _tail(root / "msrun.txt") + "".join(_tail(p) for p in (root / "msrun_logs").glob("worker_*.log"))
    assert rc_single == 0, _tail(root / "single.txt")
    return root


def _tail(path, n=3000):
    with open(path, errors="replace") as f:
        return f"\n--- {path}\n" + f.read()[-n:]


@pytest.mark.slow
def test_two_workers_train_identical_weights_equal_to_one_process(runs):
    rank0 = load_file(str(runs / "dump_multi" / "rank0.safetensors"))
    rank1 = load_file(str(runs / "dump_multi" / "rank1.safetensors"))
    single = load_file(str(runs / "dump_single" / "rank0.safetensors"))
    assert set(rank0) == set(rank1) == set(single) and len(rank0) == 3 * 132

    # the ranks hold bit-identical weights: same start (same seed), same all-reduced gradients
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)

    # equal to one process with the same global batch (2) on the same samples. Up weights start at 0, so they
    # are the trained part; observed difference ~5e-9 against updates of ~2e-3. A sharding bug (both ranks on
    # the same image) or summed instead of averaged gradients changes the update itself, by its own order.
    ups = [k for k in rank0 if k.endswith("lora_up.weight")]
    largest_update = max(np.abs(single[k]).max() for k in ups)
    assert largest_update > 1e-4
    for key in rank0:
        np.testing.assert_allclose(rank0[key], single[key], rtol=0, atol=1e-6, err_msg=key)
    assert max(np.abs(rank0[k] - single[k]).max() for k in ups) < 1e-3 * largest_update


@pytest.mark.slow
def test_only_rank0_writes_files_with_world_size_metadata(runs):
    assert sorted(os.listdir(runs / "out_multi")) == ["lora-state", "lora.safetensors"]
    saved = load_file(str(runs / "out_multi" / "lora.safetensors"))
    rank0 = load_file(str(runs / "dump_multi" / "rank0.safetensors"))
    for key in rank0:
        np.testing.assert_array_equal(saved[key], rank0[key], err_msg=key)
    with safe_open(str(runs / "out_multi" / "lora.safetensors"), framework="np") as f:
        metadata = f.metadata()
    assert metadata["ss_num_processes"] == "2"
    assert metadata["ss_total_batch_size"] == "2" and metadata["ss_batch_size_per_device"] == "1"
    assert metadata["ss_num_batches_per_epoch"] == "1"  # per rank: 2 batches of 1 shared by 2 ranks
    assert metadata["ss_steps"] == "3" and metadata["ss_num_epochs"] == "3"

    # the state: world size, and both ranks' own noise streams (different from each other)
    state_dir = runs / "out_multi" / "lora-state"
    with open(state_dir / "train_state.json") as f:
        assert json.load(f) == {"current_epoch": 3, "current_step": 3, "world_size": 2}
    with open(state_dir / "random_states.json") as f:
        streams = json.load(f)["noise_sampler_by_rank"]
    assert len(streams) == 2 and streams[0] != streams[1]

    # disk caches were split across the ranks: each image's files exist once, none left half-written
    names = sorted(os.listdir(runs / "data" / "1_sks"))
    assert names == ["img0.png", "img0.txt", "img0_0064x0064_sdxl.npz", "img0_te_outputs.npz",
                     "img1.png", "img1.txt", "img1_0064x0064_sdxl.npz", "img1_te_outputs.npz"]
    # the second rank logged no progress bar and no info lines
    with open(runs / "msrun_logs" / "worker_1.log", errors="replace") as f:
        worker1 = f.read()
    assert "steps:" not in worker1 and "INFO train_network" not in worker1 and "LoRA saved" not in worker1


@pytest.mark.slow
def test_a_training_run_prints_no_third_party_warnings(runs):
    with open(runs / "single.txt", errors="replace") as f:
        output = f.read()
    assert "LoRA saved to" in output
    # MindSpore's C++ log lines look like "[WARNING] CORE(...)" (193 of them in a 2-step run before GLOG_v=3)
    noise = ("[WARNING]", "None of PyTorch, TensorFlow", "Config not found for", "FutureWarning")
    assert [line for line in output.splitlines() if any(n in line for n in noise)] == []
