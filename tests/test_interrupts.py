"""Ctrl-C during training: the step finishes, the LoRA and the state are saved, the logs are flushed, and
--resume continues from there."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open

from test_graph_compile import logged_losses
from train_helpers import write_training_workspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def flags(ckpt, data_dir, output_dir, cache_dir, max_steps):
    return [
        sys.executable, os.path.join(REPO, "sdxl_train_network.py"), "--pretrained_model_name_or_path", ckpt,
        "--train_data_dir", data_dir, "--resolution", "64", "--caption_extension", ".txt",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--seed", "5",
        "--cache_latents", "--network_train_unet_only", "--cache_text_encoder_outputs", "--learning_rate", "1e-3",
        "--max_train_steps", str(max_steps), "--save_state", "--output_dir", str(output_dir), "--output_name", "lora",
        "--logging_dir", str(output_dir / "logs"), "--compile_cache_dir", str(cache_dir),
    ]


def test_sigint_saves_and_resume_continues(tmp_path):
    ckpt, data_dir = write_training_workspace(tmp_path, num_images=2, num_repeats=1)
    out, cache = tmp_path / "out", tmp_path / "cache"
    log_path = tmp_path / "run.txt"
    with open(log_path, "w") as log:
        run = subprocess.Popen(flags(ckpt, data_dir, out, cache, 200), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while run.poll() is None and time.time() < deadline:
            done = [int(n) for n in re.findall(r"\b(\d+)/200\b", log_path.read_text(errors="replace"))]
            if done and max(done) >= 3:
                break
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        returncode = run.wait(timeout=300)
    output = log_path.read_text(errors="replace")
    assert returncode == 130, output[-3000:]
    # MindSpore's runtime turns a Ctrl-C during a step into SIGTERM (library/interrupts.py): either name is right
    match = re.search(r"SIG(?:INT|TERM): stopped after step (\d+) of 200; saved (\S+) and (\S+); continue with the same "
                      r"command and --resume (\S+)", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert 3 <= step < 200
    lora_path = out / f"lora-step{step:08d}.safetensors"
    assert match.group(2) == str(lora_path) and match.group(4) == match.group(3)
    with safe_open(str(lora_path), framework="np") as f:
        assert all(np.isfinite(f.get_tensor(k)).all() for k in f.keys())
        assert f.metadata()["ss_steps"] == str(step)
    assert len(logged_losses(out)) == step  # every step's loss reached the event file

    resumed = subprocess.run(flags(ckpt, data_dir, tmp_path / "resumed", cache, step + 2) + ["--resume", match.group(3)],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {match.group(3)} at step {step}" in resumed.stderr
    assert "loading the training step from the compile cache" in resumed.stderr
    assert len(logged_losses(tmp_path / "resumed")) == 2  # steps step+1 and step+2 only
