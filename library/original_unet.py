"""The Stable Diffusion 1.x / 2.x UNet in diffusers' `UNet2DConditionModel` layout, as kohya's `original_unet`.

Parameter names are a diffusers state dict's (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`,
`mid_block.resnets.1.conv2.bias`, `up_blocks.3.resnets.2.conv_shortcut.weight`, ...): the names upstream's LoRA
files are built from. Single-file checkpoints store the LDM layout (`input_blocks` / `middle_block` /
`output_blocks`); `library/original_unet_conversion.py` maps between the two.

The architecture is SD's: every level but the deepest has one Transformer2DModel after each resnet, the middle
block is resnet -> transformer -> resnet, and the up path mirrors the down path with one resnet more per level,
each taking a skip. SD 1.x and 2.x differ only in config (see configs/sd_v1.json, configs/sd_v2.json): the text
width (768 / 1024), `attention_head_dim` (diffusers' name for the number of heads: 8 everywhere / 5, 10, 20, 20,
i.e. 64-wide heads) and `use_linear_projection` (1x1 convs / Linear in the transformers).

The transformer cells (Transformer2DModel, BasicTransformerBlock, CrossAttention, FeedForward) and the timestep
embedding are the SDXL UNet's (library/sdxl_original_unet.py): the two layouts name them alike. The resnets and
resamplers here have diffusers' parameter names, and the class names the LoRA network looks for
(`ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `Transformer2DModel`). Attention scores are computed in fp32,
which is diffusers' `upcast_attention=True` for every model (upstream builds SD 2.x without it; identical in fp32).
"""

import logging

import mindspore as ms
from mindspore import nn, ops

from library import graph_reuse, layers
from library.sdxl_original_unet import Transformer2DModel, timestep_embedding, use_flash_attention_in

logger = logging.getLogger(__name__)

# SD 1.5 (v1-inference.yaml); keep in sync with configs/sd_v1.json
SD_V1_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "use_linear_projection": False,
    "norm_num_groups": 32,
}

# diffusers' resnet epsilon for UNet2DConditionModel (the transformers' GroupNorm uses 1e-6)
_RESNET_NORM_EPS = 1e-5


class Timesteps(nn.Cell):
    """Sinusoidal timestep features: [cos, sin], shift 0 (diffusers' flip_sin_to_cos=True, freq_shift=0)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def construct(self, timesteps):
        return timestep_embedding(timesteps, self.num_channels)


class TimestepEmbedding(nn.Cell):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = layers.dense(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = layers.dense(time_embed_dim, time_embed_dim)

    def construct(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(graph_reuse.ReusedCell):
    """diffusers' ResnetBlock2D: two 3x3 convs with the time embedding added in between; a 1x1 conv skip
    (`conv_shortcut`) when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int):
        super().__init__()
        self.norm1 = layers.GroupNorm(groups, in_channels, eps=_RESNET_NORM_EPS)
        self.conv1 = layers.conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = layers.dense(temb_channels, out_channels)
        self.norm2 = layers.GroupNorm(groups, out_channels, eps=_RESNET_NORM_EPS)
        self.conv2 = layers.conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.use_shortcut = in_channels != out_channels
        if self.use_shortcut:
            self.conv_shortcut = layers.conv2d(in_channels, out_channels, 1)

    def construct(self, x, temb):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        # an explicit broadcast: CPU's broadcasting Add keeps index buffers of the output's size for the graph's life
        h = h + ops.broadcast_to(self.time_emb_proj(self.nonlinearity(temb)).astype(h.dtype)[:, :, None, None], h.shape)
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        if self.use_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv with symmetric padding 1 (the UNet's; the VAE pads bottom/right only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = layers.conv2d(channels, channels, 3, stride=2, padding=1)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest x2, cropped to the size of the skip it meets, then a 3x3 conv.

    A stride-2 conv turns an odd size n into (n + 1) / 2, so upsampling gives n + 1: the crop restores n, and
    equals torch's nearest interpolation to size n (upstream's `upsample_size`), which picks source row
    floor(i * m / n) = floor(i / 2) for n = 2m - 1.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = layers.conv2d(channels, channels, 3, padding=1)

    def construct(self, x, size_like):
        x = layers.upsample_nearest_2x(x)[:, :, : size_like.shape[2], : size_like.shape[3]]
        return self.conv(x)


def _transformer(channels, heads, cross_attention_dim, groups, use_linear_projection):
    if channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
    return Transformer2DModel(channels, heads, channels // heads, 1, cross_attention_dim, groups,
                              use_linear_projection)


class DownBlock2D(nn.Cell):
    """One level of the down path (diffusers' CrossAttnDownBlock2D, or DownBlock2D when `heads` is None).

    construct -> (output, the skips it leaves: one per resnet, plus the downsampled output)."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, add_downsample, heads=None,
                 cross_attention_dim=None, use_linear_projection=False):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels,
                                                  temb_channels, groups) for j in range(num_layers)])
        self.has_cross_attention = heads is not None
        if self.has_cross_attention:
            self.attentions = nn.CellList([_transformer(out_channels, heads, cross_attention_dim, groups,
                                                        use_linear_projection) for _ in range(num_layers)])
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = nn.CellList([Downsample2D(out_channels)])

    def construct(self, x, temb, context):
        skips = ()
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.has_cross_attention:
                x = self.attentions[j](x, context)
            skips = skips + (x,)
        if self.add_downsample:
            x = self.downsamplers[0](x)
            skips = skips + (x,)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Cell):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, channels, temb_channels, groups, heads, cross_attention_dim, use_linear_projection):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, temb_channels, groups) for _ in range(2)])
        self.attentions = nn.CellList(
            [_transformer(channels, heads, cross_attention_dim, groups, use_linear_projection)])

    def construct(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock2D(nn.Cell):
    """One level of the up path (diffusers' CrossAttnUpBlock2D, or UpBlock2D when `heads` is None): each resnet
    takes the previous output concatenated with one skip, the last skip first."""

    def __init__(self, in_channels, prev_output_channels, out_channels, temb_channels, num_layers, groups,
                 add_upsample, heads=None, cross_attention_dim=None, use_linear_projection=False):
        super().__init__()
        resnets = []
        for j in range(num_layers):
            skip_channels = in_channels if j == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if j == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, groups))
        self.resnets = nn.CellList(resnets)
        self.has_cross_attention = heads is not None
        if self.has_cross_attention:
            self.attentions = nn.CellList([_transformer(out_channels, heads, cross_attention_dim, groups,
                                                        use_linear_projection) for _ in range(num_layers)])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample2D(out_channels)])

    def construct(self, x, skips, temb, context, upsample_like):
        for j, resnet in enumerate(self.resnets):
            x = resnet(ops.cat((x, skips[-1 - j]), axis=1), temb)
            if self.has_cross_attention:
                x = self.attentions[j](x, context)
        if self.add_upsample:
            x = self.upsamplers[0](x, upsample_like)
        return x


class UNet2DConditionModel(graph_reuse.GraphEntry):
    """SD 1.x / 2.x UNet; `construct(sample, timesteps, encoder_hidden_states)` predicts noise (or v).

    sample: (B, in_channels, h, w) latents; timesteps: (B,) or (1,) tensor; encoder_hidden_states: (B, L,
    cross_attention_dim) text hidden states. Returns the prediction tensor itself (upstream returns it wrapped in
    `SampleOutput`; graph mode returns tensors). The defaults are SD 1.5.
    """

    def __init__(self, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False, norm_num_groups=32):
        super().__init__()
        levels = len(block_out_channels)
        heads = [attention_head_dim] * levels if isinstance(attention_head_dim, int) else list(attention_head_dim)
        if len(heads) != levels:
            raise ValueError(f"attention_head_dim {attention_head_dim} needs one entry per level of "
                             f"block_out_channels {block_out_channels}")
        # the layout the checkpoint conversion needs (library/original_unet_conversion.py)
        self.config = {"in_channels": in_channels, "out_channels": out_channels,
                       "block_out_channels": tuple(block_out_channels), "layers_per_block": layers_per_block,
                       "attention_head_dim": attention_head_dim, "cross_attention_dim": cross_attention_dim,
                       "use_linear_projection": use_linear_projection, "norm_num_groups": norm_num_groups}
        self.gradient_checkpointing = False
        timestep_dim = block_out_channels[0]
        time_embed_dim = timestep_dim * 4
        attention = {"cross_attention_dim": cross_attention_dim, "use_linear_projection": use_linear_projection}

        self.conv_in = layers.conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(timestep_dim)
        self.time_embedding = TimestepEmbedding(timestep_dim, time_embed_dim)

        down_blocks = []
        out_ch = block_out_channels[0]
        for i, width in enumerate(block_out_channels):
            in_ch, out_ch = out_ch, width
            last = i == levels - 1
            down_blocks.append(DownBlock2D(in_ch, out_ch, time_embed_dim, layers_per_block, norm_num_groups,
                                           add_downsample=not last, heads=None if last else heads[i], **attention))
            graph_reuse.mark_resolution(down_blocks[-1], 2**i)  # its downsampler is no reused block
        self.down_blocks = nn.CellList(down_blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(block_out_channels[-1], time_embed_dim, norm_num_groups, heads[-1],
                                                 **attention)
        graph_reuse.mark_resolution(self.mid_block, 2 ** (levels - 1))

        up_blocks = []
        widths, up_heads = list(reversed(block_out_channels)), list(reversed(heads))
        out_ch = widths[0]
        for i, width in enumerate(widths):
            prev_ch, out_ch = out_ch, width
            in_ch = widths[min(i + 1, levels - 1)]
            first, last = i == 0, i == levels - 1
            up_blocks.append(UpBlock2D(in_ch, prev_ch, out_ch, time_embed_dim, layers_per_block + 1, norm_num_groups,
                                       add_upsample=not last, heads=None if first else up_heads[i], **attention))
            graph_reuse.mark_resolution(up_blocks[-1], 2 ** (levels - 1 - i))  # the resnets run before the upsampler
        self.up_blocks = nn.CellList(up_blocks)
        self.skips_per_up_block = layers_per_block + 1

        self.conv_norm_out = layers.GroupNorm(norm_num_groups, block_out_channels[0], eps=_RESNET_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = layers.conv2d(block_out_channels[0], out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict) -> "UNet2DConditionModel":
        """Build from a config dict such as the "unet" entry of configs/sd_v1.json; missing keys take SD 1.5's."""
        unknown = set(config) - set(SD_V1_UNET_CONFIG)
        if unknown:
            raise ValueError(f"unknown SD UNet config keys: {sorted(unknown)} (known: {sorted(SD_V1_UNET_CONFIG)})")
        return cls(**config)

    def set_gradient_checkpointing(self, enabled: bool):
        """Recompute each resnet's and transformer's activations in the backward pass instead of storing them
        (upstream's granularity; the up blocks cannot be recompute cells as a whole: they take their skips as a tuple).

        MindSpore cannot undo `Cell.recompute()`, so turning it off again needs a new model.
        """
        if enabled == self.gradient_checkpointing:
            return
        if not enabled:
            raise RuntimeError("gradient checkpointing cannot be switched off once enabled (MindSpore has no "
                               "inverse of Cell.recompute()); build a new UNet instead")
        for _, cell in self.cells_and_names():
            if isinstance(cell, (ResnetBlock2D, Transformer2DModel)):
                cell.recompute()
        self.gradient_checkpointing = True

    def set_use_flash_attention(self, enabled: bool) -> bool:
        """Use Ascend's fused flash attention in every attention layer; returns whether it is on.

        Only Ascend has the kernel: elsewhere a request is logged and the portable attention stays. Call it before
        the first forward: a compiled graph keeps the path it was traced with.
        """
        return use_flash_attention_in(self, enabled)

    def construct(self, sample, timesteps, encoder_hidden_states):
        timesteps = ops.broadcast_to(timesteps.reshape(-1), (sample.shape[0],))
        emb = self.time_embedding(self.time_proj(timesteps).astype(sample.dtype))

        h = self.conv_in(sample)
        # a tuple used as a stack: graph mode cannot pop from a list built in the same graph
        skips = (h,)
        for block in self.down_blocks:
            h, block_skips = block(h, emb, encoder_hidden_states)
            skips = skips + block_skips
        h = self.mid_block(h, emb, encoder_hidden_states)
        n = self.skips_per_up_block
        for block in self.up_blocks:
            block_skips = skips[-n:]
            skips = skips[:-n]
            # the next block's last skip sets the size to upsample to (the final block does not upsample)
            upsample_like = skips[-1] if skips else h
            h = block(h, block_skips, emb, encoder_hidden_states, upsample_like)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
