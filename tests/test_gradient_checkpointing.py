"""Gradient checkpointing (`SdxlUNet2DConditionModel.set_gradient_checkpointing`): the same loss and LoRA gradients
as without it, and a lower peak memory for a training step, as upstream's.

On MindSpore 2.10's CPU backend some kernels keep memory sized by their output for the graph's life (broadcasting
Add/Mul: 4x the output in index arrays); recomputation repeats the forward kernels, so before the UNet avoided them
(library/layers.py GroupNorm) checkpointing raised the peak instead of lowering it. The memory test runs the trainer's
step (bench/bench_memory.py's training rows, each in a fresh process) on a small UNet at a resolution where the
activations outweigh the compiled graph.
"""

import copy
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from library import graph_reuse, sdxl_model_util
from networks import lora

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# relative to the largest gradient of each parameter; the two graphs run the same kernels in a different order
GRAD_RTOL = 1e-5
# checkpointing must save at least this much of the step's peak (MB); measured at 768 px: 85 MB saved of ~1.65 GB
# the step adds, and repeat runs of one setting differ by ~10 MB
MIN_SAVING_MB = 40


class UNetLoss(graph_reuse.GraphEntry):
    """MSE of the UNet's prediction against a target, and its gradients for the given parameters."""

    def __init__(self, unet, params):
        super().__init__()
        self.unet = unet
        self.params = ms.ParameterTuple(params)
        self.grad = ops.GradOperation(get_by_list=True)

    def loss(self, x, timesteps, context, y, target):
        return ops.square(self.unet(x, timesteps, context, y) - target).mean()

    def construct(self, x, timesteps, context, y, target):
        return self.loss(x, timesteps, context, y, target), self.grad(self.loss, self.params)(
            x, timesteps, context, y, target)


@pytest.fixture(scope="module")
def loss_and_grads():
    """(loss, grads) of the tiny UNet with a LoRA (nonzero up weights), without and with checkpointing."""
    config = sdxl_model_util.load_model_config("tiny_sdxl")
    ms.set_seed(0)
    te1, te2, _, unet = sdxl_model_util.build_models(config)
    network = lora.create_network(1.0, 4, 2.0, None, [te1, te2], unet)
    network.apply_to([te1, te2], unet, False, True)
    rng = np.random.default_rng(0)
    for module in network.unet_loras:
        up = module.lora_up.weight
        up.set_data(ms.Tensor(rng.standard_normal(up.shape).astype(np.float32) * 0.1))
    unet_config = config["unet"]
    inputs = (
        ms.Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)),
        ms.Tensor(np.array([10, 700], np.int32)),
        ms.Tensor(rng.standard_normal((2, 77, unet_config["context_dim"])).astype(np.float32)),
        ms.Tensor(rng.standard_normal((2, unet_config["adm_in_channels"])).astype(np.float32)),
        ms.Tensor(rng.standard_normal((2, 4, 16, 16)).astype(np.float32)),
    )
    params = [p for module in network.unet_loras for p in module.trainable_params()]
    results = {}
    for checkpointing in (False, True):
        unet.set_gradient_checkpointing(checkpointing)  # one-way: the run without comes first
        loss, grads = UNetLoss(unet, params)(*inputs)
        results[checkpointing] = (float(loss.asnumpy()), [g.asnumpy() for g in grads])
    return [p.name for p in params], results


def test_same_loss_and_lora_gradients(loss_and_grads):
    names, results = loss_and_grads
    (loss_off, grads_off), (loss_on, grads_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert len(grads_on) == len(grads_off) == len(names) > 0
    for name, off, on in zip(names, grads_off, grads_on):
        scale = np.abs(off).max()
        assert scale > 0, f"{name}: zero gradient, the comparison would prove nothing"
        np.testing.assert_allclose(on, off, rtol=0, atol=GRAD_RTOL * scale, err_msg=name)


def small_unet_config(tmp_path):
    """tiny_sdxl with a two-level UNet: few kernels (a fast compile) and wide attention maps at level 1."""
    config = copy.deepcopy(sdxl_model_util.load_model_config("tiny_sdxl"))
    config["name"] = "checkpointing_probe"
    config["unet"].update({"channel_mult": [1, 2], "num_res_blocks": 1, "transformer_depth": [0, 1],
                           "num_head_channels": 32})
    path = tmp_path / "checkpointing_probe.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_checkpointing_lowers_the_training_peak(tmp_path):
    output = tmp_path / "memory.json"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "bench", "bench_memory.py"), "--only", "train",
           "--config", small_unet_config(tmp_path), "--train_resolution", "768", "--output", str(output)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {run["name"]: run for run in json.loads(output.read_text())["runs"]}
    for run in runs.values():
        assert "error" not in run, run
    without = runs["train_step"]["results"]
    with_checkpointing = runs["train_step_checkpointing"]["results"]
    assert with_checkpointing["loss"] == pytest.approx(without["loss"], rel=1e-5)
    # what the step adds on top of the built models and optimizer
    added_without = without["peak_rss_mb"] - without["peak_rss_mb_after_build"]
    added_with = with_checkpointing["peak_rss_mb"] - with_checkpointing["peak_rss_mb_after_build"]
    assert added_with < added_without - MIN_SAVING_MB, (added_with, added_without)
