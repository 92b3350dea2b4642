"""The Stable Diffusion / SDXL VAE with diffusers' `AutoencoderKL` layout, built from CPU-capable cells.

Parameter names equal a diffusers AutoencoderKL state dict (modern attention names: `to_q`, `to_k`, `to_v`,
`to_out.0`), so a diffusers VAE loads without renaming and an LDM one (`first_stage_model.*`) loads through
`vae_conversion.convert_ldm_vae_checkpoint`. mindone's AutoencoderKL is not used because its `mint` layers have
no CPU kernels (see DESIGN.md).

Cells that run under GRAPH_MODE take and return tuples: `encode` gives `(mean, logvar)`; compiled code samples
with `sample_diagonal_gaussian`, eager code may wrap them in `DiagonalGaussianDistribution`.
"""

from typing import Sequence

from mindspore import nn, ops

from library.graph_reuse import GraphEntry, ReusedCell, mark_resolution
from library.layers import GroupNorm, attention, attention_in_chunks, conv2d, dense

SDXL_VAE_SCALE_FACTOR = 0.13025

# every norm in the VAE uses this epsilon (diffusers' default for AutoencoderKL blocks)
_NORM_EPS = 1e-6


def sample_diagonal_gaussian(mean, logvar):
    """One draw from N(mean, exp(logvar)); the form to use inside a compiled `construct`.

    The noise comes from `ops.standard_normal`, a MindSpore random op, so a compiled graph draws fresh noise on
    every call (a numpy draw would be baked into the graph as a constant).
    """
    # the same clamp as LDM/diffusers: keeps exp() finite for untrained or extreme encoder outputs
    std = ops.exp(0.5 * ops.clamp(logvar, -30.0, 20.0))
    return mean + std * ops.standard_normal(mean.shape).astype(mean.dtype)


class DiagonalGaussianDistribution:
    """The encoder's posterior, as diffusers' `latent_dist`: `DiagonalGaussianDistribution(*vae.encode(x))`.

    For eager (PyNative) code. Graph mode cannot compile a class built from tensors (`jit_class` needs constant
    arguments, and a plain class falls back to the Python interpreter), so compiled cells call
    `sample_diagonal_gaussian(mean, logvar)` or use `mean` directly.
    """

    def __init__(self, mean, logvar):
        self.mean = mean
        self.logvar = logvar

    def sample(self):
        return sample_diagonal_gaussian(self.mean, self.logvar)

    def mode(self):
        return self.mean


class ResnetBlock2D(ReusedCell):
    """GroupNorm -> SiLU -> conv, twice, plus a residual (1x1 conv when the width changes); no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=_NORM_EPS)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=_NORM_EPS)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1)
        self.use_shortcut = in_channels != out_channels
        if self.use_shortcut:
            self.conv_shortcut = conv2d(in_channels, out_channels, 1)

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.use_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Cell):
    """Single-head self-attention over the H*W positions, with GroupNorm before it and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=_NORM_EPS)
        self.to_q = dense(channels, channels)
        self.to_k = dense(channels, channels)
        self.to_v = dense(channels, channels)
        self.to_out = nn.CellList([dense(channels, channels)])  # a list so the name is `to_out.0`, as in diffusers
        self.max_attention_scores = None  # layers.limit_eager_attention_scores

    def construct(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(0, 2, 1)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        if self.max_attention_scores:  # None in graph mode: a constant, so this branch is not compiled
            out = attention_in_chunks(q, k, v, 1, self.max_attention_scores)
        else:
            out = attention(q, k, v, heads=1)
        out = self.to_out[0](out).transpose(0, 2, 1).reshape(b, c, h, w)
        return x + out


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right only (as LDM and diffusers' VAE)."""

    def __init__(self, channels: int):
        super().__init__()
        # nn.Conv2d's 4-tuple padding is (top, bottom, left, right): the asymmetric pad lives in the conv itself
        self.conv = conv2d(channels, channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        h, w = x.shape[-2:]
        return self.conv(ops.interpolate(x, size=(h * 2, w * 2), mode="nearest"))


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = nn.CellList([Downsample2D(out_channels)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample2D(out_channels)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)])
        self.attentions = nn.CellList([Attention(channels, groups)])

    def construct(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(GraphEntry):  # a top-level graph when `encode` runs in graph mode
    """Image (B, in, H, W) -> moments (B, 2*latent, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.conv_in = conv2d(in_channels, block_out_channels[0], 3, padding=1)
        last = len(block_out_channels) - 1
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(block_out_channels[max(i - 1, 0)], ch, layers_per_block, groups, add_downsample=i < last)
            for i, ch in enumerate(block_out_channels)
        ])
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups)
        for i, block in enumerate(self.down_blocks):
            mark_resolution(block, 2**i)  # the resnets run before the block's downsampler
        mark_resolution(self.mid_block, 2**last)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[-1], eps=_NORM_EPS)
        self.conv_out = conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class Decoder(GraphEntry):  # a top-level graph when `decode` runs in graph mode
    """Latent (B, latent, h, w) -> image (B, out, h*f, w*f); up blocks walk the widths in reverse."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = conv2d(latent_channels, reversed_channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], groups)
        last = len(reversed_channels) - 1
        # the decoder has one resnet more per level than the encoder (LDM's num_res_blocks + 1)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], ch, layers_per_block + 1, groups, add_upsample=i < last)
            for i, ch in enumerate(reversed_channels)
        ])
        mark_resolution(self.mid_block, 2**last)
        for i, block in enumerate(self.up_blocks):
            mark_resolution(block, 2 ** (last - i))  # the resnets run before the block's upsampler
        self.conv_norm_out = GroupNorm(groups, block_out_channels[0], eps=_NORM_EPS)
        self.conv_out = conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def construct(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class AutoencoderKL(GraphEntry):
    """KL-regularised autoencoder; the defaults are the SDXL base VAE (83,653,863 parameters).

    Keyword names are the `vae` section of `configs/*.json` (and of diffusers' config.json), so
    `AutoencoderKL(**config["vae"])` builds it. Latents for the UNet are `sample() * scaling_factor`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        scaling_factor: float = SDXL_VAE_SCALE_FACTOR,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.quant_conv = conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """Image in [-1, 1], (B, C, H, W) -> (mean, logvar) of the posterior, each (B, latent, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.latent_channels], moments[:, self.latent_channels:]

    def decode(self, z):
        """Unscaled latent (divide by `scaling_factor` first) -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, x, sample_posterior: bool = False):
        """Reconstruction, as diffusers' forward: decode the posterior's mode, or a sample of it."""
        mean, logvar = self.encode(x)
        z = sample_diagonal_gaussian(mean, logvar) if sample_posterior else mean
        return self.decode(z)
