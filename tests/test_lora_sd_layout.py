"""LoRA module names and shapes for the full SD 1.5 and SD 2.x architectures (built without allocating weights),
and upstream's 25-block SD layout of block dims and block lr weights.

The expected lists are written out here from SD's channel plan in the diffusers layout upstream's names come from
(down_blocks / mid_block / up_blocks, each up resnet taking a skip), not taken from the code under test.
"""

import json
import math
import os

import pytest
from mindspore.nn.utils import no_init_parameters

from library.clip_text_model import CLIPTextModel
from library.original_unet import UNet2DConditionModel
from networks import lora

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
DIM, CONV_DIM = 4, 8
SD_WIDTHS = (320, 640, 1280, 1280)  # block_out_channels; layers_per_block 2


def transformers(widths):
    """Transformer2DModel locations and channels: every level but the deepest, after each resnet (2 down, 3 up)."""
    last = len(widths) - 1
    return ([(f"down_blocks_{i}_attentions_{j}", widths[i]) for i in range(last) for j in range(2)]
            + [("mid_block_attentions_0", widths[-1])]
            + [(f"up_blocks_{i}_attentions_{j}", widths[last - i]) for i in range(1, last + 1) for j in range(3)])


def resnets(widths):
    """(location, in channels, out channels) of every ResnetBlock2D, following the skips the down path leaves."""
    last = len(widths) - 1
    plan, skips, channels = [], [widths[0]], widths[0]
    for i, width in enumerate(widths):
        for j in range(2):
            plan.append((f"down_blocks_{i}_resnets_{j}", channels, width))
            channels = width
            skips.append(width)
        if i < last:
            skips.append(width)  # the downsampler's output
    plan += [("mid_block_resnets_0", widths[-1], widths[-1]), ("mid_block_resnets_1", widths[-1], widths[-1])]
    for i, width in enumerate(reversed(widths)):
        for j in range(3):
            plan.append((f"up_blocks_{i}_resnets_{j}", channels + skips.pop(), width))
            channels = width
    return plan


def samplers(widths):
    last = len(widths) - 1
    return ([(f"down_blocks_{i}_downsamplers_0_conv", widths[i]) for i in range(last)]
            + [(f"up_blocks_{i}_upsamplers_0_conv", widths[last - i]) for i in range(last)])


def expected_unet(with_conv: bool, context: int, linear_projection: bool, widths=SD_WIDTHS, dim=DIM,
                  conv_dim=CONV_DIM) -> dict:
    """{LoRA name: (lora_down shape, lora_up shape)} of a UNet with SD's architecture and these widths."""
    time_embed = 4 * widths[0]

    def linear(name, fan_in, fan_out):
        return name, ((dim, fan_in), (fan_out, dim))

    def conv(name, fan_in, fan_out, kernel, rank):
        return name, ((rank, fan_in, kernel, kernel), (fan_out, rank, 1, 1))

    expected = []
    for location, c in transformers(widths):
        p = f"lora_unet_{location}"
        for proj in ("proj_in", "proj_out"):  # SD1: 1x1 convs (network_dim), SD2: Linear
            expected.append(linear(f"{p}_{proj}", c, c) if linear_projection else conv(f"{p}_{proj}", c, c, 1, dim))
        t = f"{p}_transformer_blocks_0"
        expected += [linear(f"{t}_attn1_to_{x}", c, c) for x in ("q", "k", "v")]
        expected += [linear(f"{t}_attn1_to_out_0", c, c), linear(f"{t}_attn2_to_q", c, c),
                     linear(f"{t}_attn2_to_k", context, c), linear(f"{t}_attn2_to_v", context, c),
                     linear(f"{t}_attn2_to_out_0", c, c),
                     linear(f"{t}_ff_net_0_proj", c, 8 * c),  # GEGLU: value and gate
                     linear(f"{t}_ff_net_2", 4 * c, c)]
    if with_conv:
        for location, cin, cout in resnets(widths):
            p = f"lora_unet_{location}"
            expected += [conv(f"{p}_conv1", cin, cout, 3, conv_dim), conv(f"{p}_conv2", cout, cout, 3, conv_dim),
                         linear(f"{p}_time_emb_proj", time_embed, cout)]  # Dense: network_dim
            if cin != cout:
                expected.append(conv(f"{p}_conv_shortcut", cin, cout, 1, dim))  # 1x1: network_dim
        expected += [conv(f"lora_unet_{location}", c, c, 3, conv_dim) for location, c in samplers(widths)]
    return dict(expected)


def expected_text_encoder(layers: int, hidden: int, mlp: int, dim=DIM) -> dict:
    """{LoRA name: shapes} of a CLIP text encoder, SD's single one (`lora_te_`)."""

    def linear(name, fan_in, fan_out):
        return name, ((dim, fan_in), (fan_out, dim))

    expected = []
    for i in range(layers):
        p = f"lora_te_text_model_encoder_layers_{i}"
        expected += [linear(f"{p}_self_attn_{x}_proj", hidden, hidden) for x in ("q", "k", "v", "out")]
        expected += [linear(f"{p}_mlp_fc1", hidden, mlp), linear(f"{p}_mlp_fc2", mlp, hidden)]
    return dict(expected)


def shapes(loras) -> dict:
    return {m.lora_name: (tuple(m.lora_down.weight.shape), tuple(m.lora_up.weight.shape)) for m in loras}


def build(config_name, **network_args):
    config = json.load(open(os.path.join(CONFIGS, f"{config_name}.json")))
    with no_init_parameters():
        unet = UNet2DConditionModel.from_config(config["unet"])
        text_encoder = CLIPTextModel(**config["text_encoder"])
        network = lora.create_network(1.0, DIM, 1.0, None, [text_encoder], unet, **network_args)
    return network


@pytest.fixture(scope="module")
def sd1_network():
    return build("sd_v1", conv_dim=str(CONV_DIM), conv_alpha="4")


def test_expected_lists_have_kohya_counts():
    assert len(expected_unet(False, 768, False)) == 192
    assert len(expected_unet(True, 768, False)) == 278
    assert len(expected_text_encoder(12, 768, 3072)) == 72


def test_sd15_names_and_shapes(sd1_network):
    assert shapes(sd1_network.unet_loras) == expected_unet(with_conv=True, context=768, linear_projection=False)
    assert shapes(sd1_network.text_encoder_loras) == expected_text_encoder(12, 768, 3072)
    assert sd1_network.layout is lora.SD_LAYOUT


def test_sd2_names_and_shapes():
    network = build("sd_v2")
    assert shapes(network.unet_loras) == expected_unet(with_conv=False, context=1024, linear_projection=True)
    # OpenCLIP-H converted without its last resblock: 23 layers
    assert shapes(network.text_encoder_loras) == expected_text_encoder(23, 1024, 4096)


def sd_block(location: str) -> int:
    """Upstream's SD block number, written out: IN00..IN11 = 0..11, M00 = 12, OUT00..OUT11 = 13..24."""
    if location.startswith("mid_block_"):
        return 12
    side, _, level, kind, index = location.split("_")[:5]
    slot = 3 * int(level) + (2 if kind in ("downsamplers", "upsamplers") else int(index))
    return 1 + slot if side == "down" else 13 + slot


def test_block_index_follows_upstreams_25_block_layout(sd1_network):
    for module in sd1_network.unet_loras:
        location = module.lora_name[len("lora_unet_"):]
        assert lora.get_block_index(module.lora_name, lora.SD_LAYOUT) == sd_block(location), module.lora_name
    assert lora.SD_LAYOUT.num_total_blocks == 25
    assert lora.get_block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", lora.SD_LAYOUT) == -1


def test_block_dims_and_lr_weights_use_the_sd_layout():
    dims = [0] * 25
    dims[1], dims[12], dims[24] = 2, 3, 5  # IN01, M00, OUT11
    network = build("sd_v1", block_dims=",".join(map(str, dims)), block_alphas=",".join(["1"] * 25),
                    down_lr_weight="cosine", mid_lr_weight="0.5", up_lr_weight="0,0,0,0,0,0,0,0,0,0,0,2")
    ranks = {m.lora_name: m.lora_dim for m in network.unet_loras}
    expected = {name: {1: 2, 12: 3, 24: 5}[sd_block(name[len("lora_unet_"):])]
                for name in expected_unet(False, 768, False) if sd_block(name[len("lora_unet_"):]) in (1, 12, 24)}
    assert ranks == expected
    weights = network.block_lr_weight
    assert len(weights) == 25  # down(12) + mid(1) + up(12): no extra ends, unlike SDXL's 23
    assert weights[:12] == pytest.approx([math.cos(math.pi / 2 * k / 11) for k in range(12)])
    assert weights[12] == 0.5 and weights[13:] == [0.0] * 11 + [2.0]
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert descriptions == ["textencoder", "unet_block1", "unet_block12", "unet_block24"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4 * weights[1], 1e-4 * 0.5, 2e-4])


@pytest.mark.parametrize("args, message", [
    ({"block_dims": "4,4"}, r"block_dims must have 25 elements \(SD 1.x/2.x blocks\), got 2"),
    ({"block_dims": ",".join(["4"] * 25), "block_alphas": ",".join(["1"] * 23)},
     r"block_alphas must have 25 elements \(SD 1.x/2.x blocks\), got 23"),
])
def test_sdxl_sized_block_lists_are_refused_for_sd(args, message):
    with pytest.raises(ValueError, match=message):
        build("tiny_sd1", **args)
