"""LoRANetwork bookkeeping on tiny models: block dims/lrs, LoRA+, network_args errors, partial training, max norm.

Expected values are worked out by hand from the tiny config (attention at input_blocks 4, 5, 7, 8, middle_block 1
and output_blocks 0-5; 12 Linear layers per attention block; 3 text-encoder layers x 6 Linear per encoder).
"""

import json
import math
import os

import numpy as np
import pytest
from mindspore import Tensor, nn

from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.sdxl_original_unet import SdxlUNet2DConditionModel
from networks import lora

TINY = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_sdxl.json")))
TE_MODULES = 2 * 3 * 6
ATTENTION_BLOCKS = ["input_blocks_4", "input_blocks_5", "input_blocks_7", "input_blocks_8", "middle_block_1"] + [
    f"output_blocks_{i}" for i in range(6)]


def models():
    return (CLIPTextModel(**TINY["text_encoder_1"]), CLIPTextModelWithProjection(**TINY["text_encoder_2"]),
            SdxlUNet2DConditionModel(**TINY["unet"]))


def block_of(lora_name: str) -> str:
    """`lora_unet_input_blocks_4_1_proj_in` -> `input_blocks_4`."""
    return "_".join(lora_name[len("lora_unet_"):].split("_")[:3])


def test_block_dims_and_alphas_per_block():
    te1, te2, unet = models()
    # slot i of the 23 gets dim i + 1 and alpha i / 2: input_blocks k -> 1 + k, middle 1 -> 11, output k -> 13 + k
    dims = ",".join(str(i + 1) for i in range(23))
    alphas = ",".join(str(i / 2) for i in range(23))
    network = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, block_dims=dims, block_alphas=alphas)
    slot = {"input_blocks_4": 5, "input_blocks_5": 6, "input_blocks_7": 8, "input_blocks_8": 9,
            "middle_block_1": 11, **{f"output_blocks_{i}": 13 + i for i in range(6)}}
    assert len(network.unet_loras) == 12 * len(ATTENTION_BLOCKS)
    for module in network.unet_loras:
        i = slot[block_of(module.lora_name)]
        assert module.lora_dim == i + 1 and float(module.alpha.asnumpy()) == i / 2, module.lora_name
    assert {m.lora_dim for m in network.text_encoder_loras} == {4}  # text encoders keep network_dim


def test_block_lr_weights_drop_blocks_and_make_groups_with_loraplus():
    te1, te2, unet = models()
    network = lora.create_network(
        1.0, 4, 1.0, None, [te1, te2], unet,
        down_lr_weight="0,0,0,0,1,0,0,1,0.5",  # input_blocks 5 -> 0: no LoRA there
        mid_lr_weight="1,0.5",  # short: the third is filled with 1
        up_lr_weight="reverse_linear",  # output k -> (8 - k) / 8
        block_lr_zero_threshold="0.3",  # output 6, 7, 8 (0.25, 0.125, 0) -> 0
        loraplus_unet_lr_ratio="16")
    assert not any(m.lora_name.startswith("lora_unet_input_blocks_5_") for m in network.unet_loras)
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)

    expected = [("textencoder", 1e-5, 2 * TE_MODULES)]  # no text-encoder ratio: up and down together
    weights = {5: 1.0, 8: 1.0, 9: 0.5, 11: 0.5, **{13 + k: (8 - k) / 8 for k in range(6)}}
    for index, weight in weights.items():
        expected += [(f"unet_block{index}", 1e-4 * weight, 12), (f"unet_block{index} plus", 1e-4 * weight * 16, 12)]
    assert descriptions == [e[0] for e in expected]
    for group, (_, lr, count) in zip(groups, expected):
        assert group["lr"] == pytest.approx(lr) and len(group["params"]) == count
    plus = groups[2]["params"]
    assert all(p.name.endswith("lora_up.weight") for p in plus)


def test_loraplus_groups_and_dropped_zero_lr_groups():
    te1, te2, unet = models()
    network = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, loraplus_lr_ratio="4")
    groups, descriptions = network.prepare_optimizer_params([2e-5, 9e-5], None, 1e-3)  # first TE lr only
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-5, 8e-5, 1e-3, 4e-3])
    assert [len(g["params"]) for g in groups] == [TE_MODULES, TE_MODULES, 12 * 11, 12 * 11]

    groups, descriptions = network.prepare_optimizer_params(0, 1e-4, 1e-3)  # lr 0: not trained
    assert descriptions == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4])


def test_block_lr_presets():
    weights = lora.get_block_lr_weight("cosine", None, "sine+0.5")
    assert len(weights) == 23 and weights[0] == weights[22] == 1.0
    down, mid, up = weights[1:10], weights[10:13], weights[13:22]
    assert down == pytest.approx([math.cos(math.pi / 2 * k / 8) for k in range(9)])  # sin of the reversed angle
    assert mid == [1.0, 1.0, 1.0]
    assert up == pytest.approx([math.sin(math.pi / 2 * k / 8) + 0.5 for k in range(9)])
    # a single number is a one-element list (upstream silently ignored it as an unknown preset)
    assert lora.get_block_lr_weight("0.5", None, None)[1:10] == [0.5] + [1.0] * 8


@pytest.mark.parametrize("args, message", [
    ({"conv_dimm": "4"}, r"unknown network_args for networks\.lora: conv_dimm; known: conv_dim, conv_alpha"),
    ({"block_dims": "4,4"}, r"block_dims must have 23 elements \(SDXL blocks\), got 2"),
    ({"down_lr_weight": "cosin"}, r"down_lr_weight='cosin'.*preset \(cosine, sine, linear, reverse_linear, zeros"),
    ({"rank_dropout": "1"}, r"rank_dropout must be in \[0, 1\), got 1.0"),
    ({"conv_dim": "four"}, r"network_args conv_dim='four': expected an integer"),
])
def test_bad_network_args_are_clear_errors(args, message):
    te1, te2, unet = models()
    with pytest.raises(ValueError, match=message):
        lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, **args)


def test_only_lora_parameters_train():
    te1, te2, unet = models()
    network = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet, conv_dim="2")
    trainable = {id(p) for p in network.get_trainable_params()}
    assert len(trainable) == 2 * len(network.loras)
    for model in (te1, te2, unet):
        for param in model.get_parameters():
            assert param.requires_grad == (id(param) in trainable), param.name
    assert {p.name for p in network.trainable_params()} == {p.name for p in network.get_trainable_params()}


def test_train_unet_only_restores_the_text_encoders():
    te1, te2, unet = models()
    fresh_names = [name for name, _ in CLIPTextModel(**TINY["text_encoder_1"]).parameters_and_names()]
    network = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet)
    network.apply_to([te1, te2], unet, False, True)  # upstream's call shape
    attention = te1.text_model.encoder.layers[0].self_attn
    assert type(attention.q_proj) is nn.Dense
    assert [name for name, _ in te1.parameters_and_names()] == fresh_names
    assert [p.name for p in te1.get_parameters()] == fresh_names
    assert not any(k.startswith("lora_te") for k in network.lora_state_dict())
    assert len(network.get_trainable_params()) == 2 * 12 * 11
    assert isinstance(unet.middle_block[1].proj_in, lora.LoRAModule)


def test_train_text_encoders_only():
    te1, te2, unet = models()
    fresh_names = [name for name, _ in SdxlUNet2DConditionModel(**TINY["unet"]).parameters_and_names()]
    network = lora.create_network(1.0, 4, 1.0, None, [te1, te2], unet)
    network.apply_to(apply_text_encoder=True, apply_unet=False)
    assert network.unet_loras == [] and len(network.text_encoder_loras) == TE_MODULES
    assert not any(isinstance(c, lora.LoRAModule) for _, c in unet.cells_and_names())
    assert [p.name for p in unet.get_parameters()] == fresh_names  # incl. SequentialCell slots (to_out.0)
    assert all(k.startswith("lora_te") for k in network.lora_state_dict())


def test_a_second_training_network_on_the_same_model_is_refused():
    _, _, unet = models()
    network = lora.create_network(1.0, 4, 1.0, None, [], unet)
    with pytest.raises(ValueError, match="already has a LoRA layer"):
        lora.create_network(1.0, 4, 1.0, None, [], unet)
    _, _, other = models()
    with pytest.raises(ValueError, match="not the models the network was built on"):
        network.apply_to(None, other, True, True)


def test_conv_classes_are_not_targeted_by_later_networks():
    # upstream's class-attribute mutation made every network after a conv one target ResNet blocks too
    _, _, unet = models()
    lora.create_network(1.0, 4, 1.0, None, [], unet, conv_dim="2")
    _, _, other = models()
    later = lora.create_network(1.0, 4, 1.0, None, [], other)
    assert len(later.unet_loras) == 12 * 11
    assert lora.UNET_TARGET_REPLACE_MODULE == ("Transformer2DModel",)


def test_max_norm_regularization():
    _, _, unet = models()
    network = lora.create_network(1.0, 4, 2.0, None, [], unet, conv_dim="2", conv_alpha="1")
    rng = np.random.default_rng(0)
    for module in network.loras:
        for param in (module.lora_down.weight, module.lora_up.weight):
            param.set_data(Tensor(np.zeros(param.shape, np.float32)))
    big = {"lora_unet_input_blocks_4_1_proj_in": 2 / 4, "lora_unet_input_blocks_3_0_op": 1 / 2}  # name -> alpha/dim
    norms = {}
    for module in network.loras:
        if module.lora_name in big:
            down = rng.standard_normal(module.lora_down.weight.shape).astype(np.float32)
            up = rng.standard_normal(module.lora_up.weight.shape).astype(np.float32)
            module.lora_down.weight.set_data(Tensor(down))
            module.lora_up.weight.set_data(Tensor(up))
            # up is 1x1 for convs: the product is sum over rank of up[o, r] * down[r, ...]
            product = np.tensordot(up.reshape(up.shape[0], up.shape[1]), down, axes=1)
            norms[module.lora_name] = np.linalg.norm(product) * big[module.lora_name]
    max_norm = min(norms.values()) * 0.9
    keys_scaled, mean_norm, top = network.apply_max_norm_regularization(max_norm)
    assert keys_scaled == 2
    assert top == pytest.approx(max_norm, rel=1e-5)
    assert mean_norm == pytest.approx(2 * max_norm / len(network.loras), rel=1e-5)
    for module in network.loras:
        if module.lora_name in big:
            down, up = module.lora_down.weight.asnumpy(), module.lora_up.weight.asnumpy()
            product = np.tensordot(up.reshape(up.shape[0], up.shape[1]), down, axes=1) * big[module.lora_name]
            assert np.linalg.norm(product) == pytest.approx(max_norm, rel=1e-5)
