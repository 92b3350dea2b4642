"""LoRA module names and shapes for the full SDXL base architecture (built without allocating weights).

The expected lists are written out here from SDXL's channel plan (reference 4.2/4.3, 5.3), not taken from the
code under test.
"""

import json
import os

import pytest
from mindspore.nn.utils import no_init_parameters

from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.sdxl_original_unet import SdxlUNet2DConditionModel
from networks import lora

CONFIG = json.load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "sdxl_base.json")))
DIM, CONV_DIM = 4, 8
TIME_EMBED = 1280
CONTEXT = 2048

# (Transformer2DModel location, channels, depth)
TRANSFORMERS = ([(f"input_blocks_{i}_1", 640, 2) for i in (4, 5)] + [(f"input_blocks_{i}_1", 1280, 10) for i in (7, 8)]
                + [("middle_block_1", 1280, 10)] + [(f"output_blocks_{i}_1", 1280, 10) for i in (0, 1, 2)]
                + [(f"output_blocks_{i}_1", 640, 2) for i in (3, 4, 5)])
# (ResnetBlock2D location, in channels, out channels); output blocks take the concatenated skip
RESNETS = [("input_blocks_1_0", 320, 320), ("input_blocks_2_0", 320, 320), ("input_blocks_4_0", 320, 640),
           ("input_blocks_5_0", 640, 640), ("input_blocks_7_0", 640, 1280), ("input_blocks_8_0", 1280, 1280),
           ("middle_block_0", 1280, 1280), ("middle_block_2", 1280, 1280),
           ("output_blocks_0_0", 2560, 1280), ("output_blocks_1_0", 2560, 1280), ("output_blocks_2_0", 1920, 1280),
           ("output_blocks_3_0", 1920, 640), ("output_blocks_4_0", 1280, 640), ("output_blocks_5_0", 960, 640),
           ("output_blocks_6_0", 960, 320), ("output_blocks_7_0", 640, 320), ("output_blocks_8_0", 640, 320)]
SAMPLERS = [("input_blocks_3_0_op", 320), ("input_blocks_6_0_op", 640),
            ("output_blocks_2_2_conv", 1280), ("output_blocks_5_2_conv", 640)]


def linear(name, fan_in, fan_out, dim=DIM):
    return name, ((dim, fan_in), (fan_out, dim))


def conv(name, fan_in, fan_out, kernel, dim):
    return name, ((dim, fan_in, kernel, kernel), (fan_out, dim, 1, 1))


def expected_unet(with_conv: bool) -> dict:
    expected = []
    for location, c, depth in TRANSFORMERS:
        p = f"lora_unet_{location}"
        expected += [linear(f"{p}_proj_in", c, c), linear(f"{p}_proj_out", c, c)]
        for b in range(depth):
            t = f"{p}_transformer_blocks_{b}"
            expected += [linear(f"{t}_attn1_to_{x}", c, c) for x in ("q", "k", "v")]
            expected += [linear(f"{t}_attn1_to_out_0", c, c), linear(f"{t}_attn2_to_q", c, c),
                         linear(f"{t}_attn2_to_k", CONTEXT, c), linear(f"{t}_attn2_to_v", CONTEXT, c),
                         linear(f"{t}_attn2_to_out_0", c, c),
                         linear(f"{t}_ff_net_0_proj", c, 8 * c),  # GEGLU: value and gate
                         linear(f"{t}_ff_net_2", 4 * c, c)]
    if with_conv:
        for location, cin, cout in RESNETS:
            p = f"lora_unet_{location}"
            expected += [conv(f"{p}_in_layers_2", cin, cout, 3, CONV_DIM), conv(f"{p}_out_layers_3", cout, cout, 3, CONV_DIM),
                         linear(f"{p}_emb_layers_1", TIME_EMBED, cout)]  # Dense: network_dim, not conv_dim
            if cin != cout:
                expected.append(conv(f"{p}_skip_connection", cin, cout, 1, DIM))  # 1x1: network_dim
        expected += [conv(f"lora_unet_{location}", c, c, 3, CONV_DIM) for location, c in SAMPLERS]
    return dict(expected)


def expected_text_encoders() -> dict:
    expected = []
    for prefix, layers, hidden, mlp in (("lora_te1", 12, 768, 3072), ("lora_te2", 32, 1280, 5120)):
        for i in range(layers):
            p = f"{prefix}_text_model_encoder_layers_{i}"
            expected += [linear(f"{p}_self_attn_{x}_proj", hidden, hidden) for x in ("q", "k", "v", "out")]
            expected += [linear(f"{p}_mlp_fc1", hidden, mlp), linear(f"{p}_mlp_fc2", mlp, hidden)]
    return dict(expected)


def shapes(loras) -> dict:
    return {m.lora_name: (tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)) for m in loras}


@pytest.fixture(scope="module")
def default_network():
    with no_init_parameters():
        unet = SdxlUNet2DConditionModel(**CONFIG["unet"])
        te1 = CLIPTextModel(**CONFIG["text_encoder_1"])
        te2 = CLIPTextModelWithProjection(**CONFIG["text_encoder_2"])
        network = lora.create_network(1.0, DIM, 1.0, None, [te1, te2], unet)
    return network, unet


def test_expected_lists_have_kohya_counts():
    assert len(expected_unet(False)) == 722
    assert len(expected_unet(True)) == 788
    assert len(expected_text_encoders()) == 264


def test_default_sdxl_names_and_shapes(default_network):
    network, _ = default_network
    assert shapes(network.unet_loras) == expected_unet(with_conv=False)
    assert shapes(network.text_encoder_loras) == expected_text_encoders()


def test_conv_dim_sdxl_names_and_shapes():
    with no_init_parameters():
        unet = SdxlUNet2DConditionModel(**CONFIG["unet"])
        network = lora.create_network(1.0, DIM, 1.0, None, [], unet, conv_dim=str(CONV_DIM), conv_alpha="4")
    assert shapes(network.unet_loras) == expected_unet(with_conv=True)
    conv_module = next(m for m in network.unet_loras if m.lora_name.endswith("in_layers_2"))
    assert conv_module.alpha.shape == ()


def test_parameter_names_unique_and_base_names_recoverable(default_network):
    network, unet = default_network
    names = [p.name for p in unet.get_parameters()]
    assert len(names) == len(set(names))
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q.org_module.weight" in names
    assert "input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in names
    with no_init_parameters():
        plain = SdxlUNet2DConditionModel(**CONFIG["unet"])
    base = lora.base_state_dict(unet)
    assert sorted(base) == sorted(name for name, _ in plain.parameters_and_names())
    assert all(not p.requires_grad for p in base.values())
    trainable = network.get_trainable_params()
    assert len(trainable) == 2 * (722 + 264) and all(p.requires_grad for p in trainable)
