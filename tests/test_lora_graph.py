"""LoRA layers inside compiled graphs (GRAPH_MODE): in-place replacement, one layer against numpy, dropouts."""

import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from library import layers
from library.sdxl_original_unet import SdxlUNet2DConditionModel
from networks import lora

TINY = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_sdxl.json")))


@pytest.fixture(scope="module")
def context_mode():
    """Restores the execution mode for the other test modules."""
    old_mode, old_sync = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    ms.set_context(pynative_synchronize=True)
    yield
    ms.set_context(mode=old_mode, pynative_synchronize=old_sync)


def set_random(param, rng, scale=0.2):
    param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * scale, param.dtype))


@pytest.fixture(scope="module")
def compiled_unet(context_mode):
    rng = np.random.default_rng(0)
    cfg = TINY["unet"]
    unet = SdxlUNet2DConditionModel(**cfg)
    unet.set_train(False)
    inputs = (Tensor(rng.standard_normal((1, 4, 16, 16)).astype(np.float32)), Tensor(np.array([500], np.int32)),
              Tensor(rng.standard_normal((1, 8, cfg["context_dim"])).astype(np.float32)),
              Tensor(rng.standard_normal((1, cfg["adm_in_channels"])).astype(np.float32)))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    base_out = unet(*inputs).asnumpy()  # before any LoRA exists

    network = lora.create_network(1.0, 4, 2.0, None, [], unet, conv_dim="4")
    for module in network.unet_loras:
        set_random(module.lora_up.weight, rng)
    ms.set_context(mode=ms.GRAPH_MODE)
    lora_out = unet(*inputs).asnumpy()  # compiled after the replacement
    return unet, network, inputs, base_out, lora_out


def test_compiled_unet_contains_the_lora_layers(compiled_unet):
    unet, network, inputs, base_out, lora_out = compiled_unet
    assert np.abs(lora_out - base_out).max() > 1e-2
    # the multiplier is a parameter: 0 switches every LoRA off without recompiling
    network.set_multiplier(0.0)
    try:
        off = unet(*inputs).asnumpy()
    finally:
        network.set_multiplier(1.0)
    np.testing.assert_allclose(off, base_out, atol=1e-5)


def test_one_layer_matches_numpy(compiled_unet):
    unet, network, *_ = compiled_unet
    module = next(m for m in network.unet_loras if m.lora_name == "lora_unet_input_blocks_4_1_proj_in")
    assert module is unet.input_blocks[4][1].proj_in  # replaced in place, in its parent
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, module.org_module.in_channels)).astype(np.float32)
    network.set_multiplier(0.5)
    try:
        out = module(Tensor(x)).asnumpy()  # graph mode: compiles this layer on its own
    finally:
        network.set_multiplier(1.0)
    w, b = module.org_module.weight.asnumpy(), module.org_module.bias.asnumpy()
    down, up = module.lora_down.weight.asnumpy(), module.lora_up.weight.asnumpy()
    expected = x @ w.T + b + 0.5 * (2.0 / 4) * ((x @ down.T) @ up.T)  # multiplier 0.5, alpha 2, dim 4
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class DropoutProbe(nn.Cell):
    def __init__(self, neuron, rank, module):
        super().__init__()
        self.neuron, self.rank, self.module = neuron, rank, module

    def construct(self, x):
        return self.neuron(x), self.rank(x), self.module(x)


@pytest.fixture(scope="module")
def dropout_probe(context_mode):
    rng = np.random.default_rng(2)
    ms.set_context(mode=ms.GRAPH_MODE)

    def make(**dropouts):
        module = lora.LoRAModule("probe", layers.dense(3, 5), lora_dim=2, alpha=2, **dropouts)
        set_random(module.lora_up.weight, rng, 1.0)
        return module

    probe = DropoutProbe(make(dropout=0.5), make(rank_dropout=0.5), make(module_dropout=0.5))
    x = rng.standard_normal((2, 3, 3)).astype(np.float32)  # (batch, tokens, features)
    return probe, x


def branch_in_rank_space(module, x, out):
    """Recover the dropped-out lora_down output from the LoRA branch: up has full column rank."""
    org = x @ module.org_module.weight.asnumpy().T + module.org_module.bias.asnumpy()
    up = module.lora_up.weight.asnumpy()
    branch = (out - org).reshape(-1, up.shape[0])
    solved = np.linalg.lstsq(up, branch.T, rcond=None)[0].T
    return solved.reshape(out.shape[:-1] + (up.shape[1],))


def test_dropouts_are_redrawn_every_step_in_training(dropout_probe):
    probe, x = dropout_probe
    probe.set_train(True)
    neuron_seen, rank_seen, module_seen = set(), set(), set()
    for _ in range(16):
        outs = [o.asnumpy() for o in probe(Tensor(x))]
        for module, out, seen in zip((probe.neuron, probe.rank, probe.module), outs,
                                     (neuron_seen, rank_seen, module_seen)):
            lx = x @ module.lora_down.weight.asnumpy().T
            kept = branch_in_rank_space(module, x, out)
            if module is probe.module:
                # whole branch on (scale 1) or off
                on = np.allclose(kept, lx, atol=1e-4)
                assert on or np.allclose(kept, 0, atol=1e-4)
                seen.add(on)
                continue
            # each kept element is rescaled by 1/(1-p) = 2, each dropped one is 0
            mask = np.isclose(kept, 2 * lx, atol=1e-4)
            assert np.all(mask | np.isclose(kept, 0, atol=1e-4))
            if module is probe.rank:  # one draw per (sample, rank), shared by every token
                assert np.all(mask == mask[:, :1, :])
            seen.add(mask.tobytes())
    assert len(neuron_seen) > 1 and len(rank_seen) > 1 and module_seen == {True, False}


def test_dropouts_are_off_outside_training(dropout_probe):
    probe, x = dropout_probe
    probe.set_train(False)
    try:
        for module, out in zip((probe.neuron, probe.rank, probe.module), probe(Tensor(x))):
            lx = x @ module.lora_down.weight.asnumpy().T
            np.testing.assert_allclose(branch_in_rank_space(module, x, out.asnumpy()), lx, atol=1e-4)
    finally:
        probe.set_train(True)
