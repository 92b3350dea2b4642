"""The SDXL UNet in Stability's SGM layout (`input_blocks` / `middle_block` / `output_blocks`).

Parameter names from `parameters_and_names()` are the single-file checkpoint's `model.diffusion_model.*` keys
without that prefix, so a checkpoint loads without renaming. Cell class names are those of kohya's
`sdxl_original_unet` (`Transformer2DModel`, `ResnetBlock2D`, ...), because the LoRA network picks its targets
by class name, and every Linear/Conv is a plain `nn.Dense`/`nn.Conv2d` that a LoRA cell can replace in place.

Built from `mindspore.nn`/`ops` cells with CPU, GPU and Ascend kernels. Weights use torch's default init as
kohya's UNet does (SGM zero-initialises some output layers; irrelevant once a checkpoint is loaded, and
random tiny models would otherwise ignore their conditioning).
"""

import logging
import math

import mindspore as ms
from mindspore import nn, ops

from library import graph_reuse, layers

logger = logging.getLogger(__name__)

# SDXL base 1.0 (sd_xl_base.yaml); keep in sync with configs/sdxl_base.json
SDXL_BASE_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": (1, 2, 4),
    "num_res_blocks": 2,
    "transformer_depth": (0, 2, 10),
    "num_head_channels": 64,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "norm_num_groups": 32,
}


def timestep_embedding(timesteps, dim: int, max_period: int = 10000):
    """Sinusoidal embedding (B,) -> (B, dim) in fp32: [cos(t * f), sin(t * f)], f_k = max_period^(-k / (dim // 2)).

    Cos comes first and the frequency shift is 0, as in SGM (diffusers' default order differs). The SDXL size
    conditioning uses the same function with dim 256.
    """
    half = dim // 2
    # fp64 then rounded: MindSpore's fp32 exp on CPU is off by ~4e-6 relative, which at t=999 shifts the phase of
    # the fastest frequencies by ~4e-3 rad against torch's fp32 table
    exponent = ops.arange(0, half, dtype=ms.float64) * (-math.log(max_period) / half)
    freqs = ops.exp(exponent).astype(ms.float32)
    args = timesteps.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    embedding = ops.cat((ops.cos(args), ops.sin(args)), axis=-1)
    if dim % 2:
        embedding = ops.cat((embedding, ops.zeros_like(embedding[:, :1])), axis=-1)
    return embedding


def use_flash_attention_in(model: nn.Cell, enabled: bool) -> bool:
    """Switch every CrossAttention of `model` to Ascend's flash attention (where the device has it)."""
    if enabled and ms.get_context("device_target") != "Ascend":
        logger.warning("flash attention needs an Ascend device (target is %s); using standard attention",
                       ms.get_context("device_target"))
        enabled = False
    for _, cell in model.cells_and_names():
        if isinstance(cell, CrossAttention):
            cell.use_flash_attention = enabled
    return enabled


class CrossAttention(nn.Cell):
    """Multi-head attention; self-attention when `context_dim` is None. Only the output projection has a bias."""

    def __init__(self, query_dim: int, context_dim=None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.use_flash_attention = False
        self.max_attention_scores = None  # layers.limit_eager_attention_scores
        self.to_q = layers.dense(query_dim, inner_dim, bias=False)
        self.to_k = layers.dense(context_dim, inner_dim, bias=False)
        self.to_v = layers.dense(context_dim, inner_dim, bias=False)
        # [Linear, Dropout(0)] in the checkpoint; the identity keeps index 0 for the Linear
        self.to_out = nn.SequentialCell([layers.dense(inner_dim, query_dim), layers.Identity()])

    def construct(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.use_flash_attention:
            # the Ascend kernel takes fp16/bf16 only
            dtype = ms.float16 if q.dtype == ms.float32 else q.dtype
            out = ops.flash_attention_score(q.astype(dtype), k.astype(dtype), v.astype(dtype), self.heads,
                                            scalar_value=self.scale, input_layout="BSH").astype(q.dtype)
        elif self.max_attention_scores:  # None in graph mode: a constant, so this branch is not compiled
            out = layers.attention_in_chunks(q, k, v, self.heads, self.max_attention_scores)
        else:
            out = layers.attention(q, k, v, self.heads)
        return self.to_out(out)


class GEGLU(nn.Cell):
    """Linear to twice the width, then value * gelu(gate) (exact, erf-based gelu as torch's default)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = layers.dense(dim_in, dim_out * 2)

    def construct(self, x):
        value, gate = ops.chunk(self.proj(x), 2, axis=-1)
        # exact gelu written out: ops.gelu(approximate="none") held ~11x its input in a CPU train step (measured,
        # MindSpore 2.10), this form ~3x
        return value * (gate * 0.5 * (ops.erf(gate * 0.7071067811865476) + 1.0))


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # [GEGLU, Dropout(0), Linear] in the checkpoint
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), layers.Identity(), layers.dense(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(graph_reuse.ReusedCell):
    """Pre-norm self-attention, cross-attention on the text context, and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = layers.LayerNorm(dim)
        self.norm2 = layers.LayerNorm(dim)
        self.norm3 = layers.LayerNorm(dim)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(graph_reuse.ReusedCell):
    """SGM's SpatialTransformer: (B, C, H, W) -> tokens -> blocks -> (B, C, H, W) + input.

    Projections are Linear on the tokens (SDXL, SD 2.x) or, with `use_linear_projection=False`, 1x1 convs on the
    feature map (SD 1.x); the two compute the same map with the weight stored as [C, C] or [C, C, 1, 1].
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, num_groups: int = 32,
                 use_linear_projection: bool = True):
        super().__init__()
        inner_dim = heads * dim_head
        if inner_dim != channels:
            raise ValueError(f"Transformer2DModel: heads x dim_head ({heads} x {dim_head}) must equal the {channels} "
                             "channels")
        self.use_linear_projection = use_linear_projection
        projection = layers.dense if use_linear_projection else lambda cin, cout: layers.conv2d(cin, cout, 1)
        self.norm = layers.GroupNorm(num_groups, channels, eps=1e-6)
        self.proj_in = projection(channels, inner_dim)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = projection(inner_dim, channels)
        if not use_linear_projection:
            # with 1x1-conv projections, MindSpore 2.10 ran a block's shared graph with another block's weights
            # (tiny SD 1.x UNet, graph mode 0.4 off PyNative; tests/test_original_unet.py): parse each on its own
            for block in self.transformer_blocks:
                block.shares_graph = False

    def construct(self, x, context):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear_projection:
            hidden = self.proj_in(hidden)
        hidden = hidden.transpose(0, 2, 3, 1).reshape(b, h * w, c)
        if self.use_linear_projection:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear_projection:
            hidden = self.proj_out(hidden)
        hidden = hidden.reshape(b, h, w, c).transpose(0, 3, 1, 2)
        if not self.use_linear_projection:
            hidden = self.proj_out(hidden)
        return hidden + x


class ResnetBlock2D(graph_reuse.ReusedCell):
    """SGM ResBlock: two 3x3 convs with the time embedding added in between; 1x1 conv skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, num_groups: int = 32):
        super().__init__()
        self.in_layers = nn.SequentialCell([
            layers.GroupNorm(num_groups, in_channels), nn.SiLU(),
            layers.conv2d(in_channels, out_channels, 3, padding=1)])
        self.emb_layers = nn.SequentialCell([nn.SiLU(), layers.dense(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell([
            layers.GroupNorm(num_groups, out_channels), nn.SiLU(), layers.Identity(),  # Identity: SGM's Dropout(0)
            layers.conv2d(out_channels, out_channels, 3, padding=1)])
        if in_channels == out_channels:
            self.skip_connection = layers.Identity()
        else:
            self.skip_connection = layers.conv2d(in_channels, out_channels, 1)

    def construct(self, x, emb):
        h = self.in_layers(x)
        # broadcast explicitly: an Add of differently shaped operands keeps 4x its output in index arrays on
        # MindSpore 2.10's CPU (library/layers.py GroupNorm)
        h = h + ops.broadcast_to(self.emb_layers(emb).astype(h.dtype)[:, :, None, None], h.shape)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample2D(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.op = layers.conv2d(channels, channels, 3, stride=2, padding=1)

    def construct(self, x):
        return self.op(x)


class Upsample2D(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = layers.conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(layers.upsample_nearest_2x(x))


class TimestepEmbedSequential(nn.SequentialCell):
    """One UNet block: passes the time embedding to resnets and the text context to transformers."""

    def construct(self, x, emb, context):
        for layer in self.cell_list:
            if isinstance(layer, ResnetBlock2D):
                x = layer(x, emb)
            elif isinstance(layer, Transformer2DModel):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class SdxlUNet2DConditionModel(graph_reuse.GraphEntry):
    """SDXL UNet; `construct(x, timesteps, context, y)` predicts noise (or v) with the shape of `x`.

    x: (B, in_channels, h, w) latents; timesteps: (B,) or (1,) tensor; context: (B, L, context_dim) text hidden
    states; y: (B, adm_in_channels) pooled text embedding + size embeddings. The defaults are SDXL base 1.0.
    """

    def __init__(self, in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
                 transformer_depth=(0, 2, 10), num_head_channels=64, context_dim=2048, adm_in_channels=2816,
                 norm_num_groups=32):
        super().__init__()
        if len(transformer_depth) != len(channel_mult):
            raise ValueError(f"transformer_depth {transformer_depth} needs one entry per level of {channel_mult}")
        self.model_channels = model_channels
        self.gradient_checkpointing = False
        time_embed_dim = model_channels * 4
        groups = norm_num_groups

        def resnet(cin, cout):
            return ResnetBlock2D(cin, cout, time_embed_dim, groups)

        def transformer(ch, depth):
            return Transformer2DModel(ch, ch // num_head_channels, num_head_channels, depth, context_dim, groups)

        self.time_embed = nn.SequentialCell([
            layers.dense(model_channels, time_embed_dim), nn.SiLU(), layers.dense(time_embed_dim, time_embed_dim)])
        # nested as in SGM, hence the `label_emb.0.` prefix of the checkpoint keys
        self.label_emb = nn.SequentialCell([nn.SequentialCell([
            layers.dense(adm_in_channels, time_embed_dim), nn.SiLU(), layers.dense(time_embed_dim, time_embed_dim)])])

        input_blocks = [TimestepEmbedSequential([layers.conv2d(in_channels, model_channels, 3, padding=1)])]
        skip_channels = [model_channels]  # channels of each skip, consumed in reverse by the output blocks
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = [resnet(ch, mult * model_channels)]
                ch = mult * model_channels
                if transformer_depth[level] > 0:
                    block.append(transformer(ch, transformer_depth[level]))
                input_blocks.append(TimestepEmbedSequential(block))
                graph_reuse.mark_resolution(input_blocks[-1], 2**level)
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                input_blocks.append(TimestepEmbedSequential([Downsample2D(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nn.CellList(input_blocks)

        self.middle_block = TimestepEmbedSequential(
            [resnet(ch, ch), transformer(ch, transformer_depth[-1]), resnet(ch, ch)])
        graph_reuse.mark_resolution(self.middle_block, 2 ** (len(channel_mult) - 1))

        output_blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = [resnet(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if transformer_depth[level] > 0:
                    block.append(transformer(ch, transformer_depth[level]))
                if level > 0 and i == num_res_blocks:
                    block.append(Upsample2D(ch))
                output_blocks.append(TimestepEmbedSequential(block))
                graph_reuse.mark_resolution(output_blocks[-1], 2**level)
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([
            layers.GroupNorm(groups, ch), nn.SiLU(), layers.conv2d(model_channels, out_channels, 3, padding=1)])

    @classmethod
    def from_config(cls, config: dict) -> "SdxlUNet2DConditionModel":
        """Build from a config dict such as the "unet" entry of configs/sdxl_base.json; missing keys take SDXL's."""
        unknown = set(config) - set(SDXL_BASE_UNET_CONFIG)
        if unknown:
            raise ValueError(f"unknown UNet config keys: {sorted(unknown)}")
        return cls(**config)

    def set_gradient_checkpointing(self, enabled: bool):
        """Recompute each input/middle/output block's activations in the backward pass instead of storing them.

        MindSpore cannot undo `Cell.recompute()`, so turning it off again needs a new model.
        """
        if enabled == self.gradient_checkpointing:
            return
        if not enabled:
            raise RuntimeError("gradient checkpointing cannot be switched off once enabled (MindSpore has no "
                               "inverse of Cell.recompute()); build a new UNet instead")
        for block in list(self.input_blocks) + [self.middle_block] + list(self.output_blocks):
            block.recompute()
        self.gradient_checkpointing = True

    def set_use_flash_attention(self, enabled: bool) -> bool:
        """Use Ascend's fused flash attention in every attention layer; returns whether it is on.

        Only Ascend has the kernel: elsewhere a request is logged and the portable attention stays. Call it before
        the first forward: a compiled graph keeps the path it was traced with.
        """
        return use_flash_attention_in(self, enabled)

    def construct(self, x, timesteps, context, y):
        timesteps = ops.broadcast_to(timesteps.reshape(-1), (x.shape[0],))
        t_emb = timestep_embedding(timesteps, self.model_channels).astype(x.dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y)

        # a tuple used as a stack: graph mode cannot pop from a list built in the same graph
        skips = ()
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips = skips + (h,)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(ops.cat((h, skips[-1]), axis=1), emb, context)
            skips = skips[:-1]
        return self.out(h)
