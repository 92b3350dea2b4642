"""Small building blocks shared by the UNet, the VAE and the text encoders.

They exist for two reasons:
- parameter names: MindSpore's own norm and embedding cells call their parameters `gamma`/`beta`/
  `embedding_table`; checkpoints (torch, SGM, diffusers, HF) call them `weight`/`bias`. Using cells whose
  attribute names are the checkpoint's makes a model's `parameters_and_names()` equal the checkpoint keys,
  so loading needs no per-layer renaming.
- backends: everything here is built from `mindspore.ops` primitives that have CPU, GPU and Ascend kernels
  (the `mint` equivalents mostly have no CPU kernel, see DESIGN.md).
"""

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, with torch's `weight`/`bias` names."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.weight = Parameter(initializer(One(), (normalized_shape,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (normalized_shape,), ms.float32), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        # normalise in fp32 so fp16 activations do not overflow the variance
        y, _, _ = self.layer_norm(x.astype(ms.float32), self.weight.astype(ms.float32), self.bias.astype(ms.float32))
        return y.astype(x.dtype)


class GroupNorm(nn.Cell):
    """GroupNorm over (B, C, ...) tensors, with torch's `weight`/`bias` names; computed in fp32."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(initializer(One(), (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (num_channels,), ms.float32), name="bias")

    def construct(self, x):
        # the fused GroupNorm kernel, not mean/var/affine from broadcasting ops: MindSpore 2.10's CPU Add/Sub/Mul/
        # RealDiv keep two size_t index arrays of the output's length (4x an fp32 output) for the graph's life
        # whenever the operands' shapes differ, which made each GroupNorm hold ~30x its input in a train step
        # and gradient checkpointing (which repeats those kernels) cost memory instead of saving it (measured)
        h = ops.group_norm(ops.cast(x, ms.float32), self.num_groups, ops.cast(self.weight, ms.float32),
                           ops.cast(self.bias, ms.float32), self.eps)
        return ops.cast(h, x.dtype)


class Embedding(nn.Cell):
    """Lookup table with torch's `weight` name."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (num_embeddings, embedding_dim), ms.float32), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class Identity(nn.Cell):
    """A parameterless placeholder that keeps a slot's index, as torch's nn.Identity does in Sequentials."""

    def construct(self, x):
        return x


def dense(in_features: int, out_features: int, bias: bool = True) -> nn.Dense:
    """nn.Dense with torch.nn.Linear's default init (uniform in +-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(in_features)
    weight = initializer(ms.common.initializer.Uniform(bound), (out_features, in_features), ms.float32)
    bias_init = initializer(ms.common.initializer.Uniform(bound), (out_features,), ms.float32) if bias else None
    return nn.Dense(in_features, out_features, weight_init=weight, bias_init=bias_init, has_bias=bias)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
           bias: bool = True) -> nn.Conv2d:
    """nn.Conv2d with explicit padding (pad_mode="pad", as torch) and torch's default init."""
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    weight = initializer(ms.common.initializer.Uniform(bound), (out_channels, in_channels, kernel_size, kernel_size),
                         ms.float32)
    bias_init = initializer(ms.common.initializer.Uniform(bound), (out_channels,), ms.float32) if bias else None
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding,
                     has_bias=bias, weight_init=weight, bias_init=bias_init)


def upsample_nearest_2x(x):
    """(B, C, H, W) -> (B, C, 2H, 2W), nearest neighbour, as a broadcast: exact, differentiable and free of
    backend-specific resize kernels."""
    b, c, h, w = x.shape
    return ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, h * 2, w * 2)


def attention(q, k, v, heads: int, mask=None):
    """Multi-head scaled dot-product attention on (B, L, C) tensors; returns (B, Lq, C).

    `mask` is added to the scores (e.g. a causal mask of -inf above the diagonal), broadcast over heads.
    Scores and softmax are computed in fp32 for stability, as torch's math backend does under autocast.
    """
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads

    def split_heads(t, length):
        return t.reshape(b, length, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, length, d)

    qh, kh, vh = split_heads(q, lq), split_heads(k, lk), split_heads(v, lk)
    scores = ops.bmm(qh.astype(ms.float32), kh.astype(ms.float32).transpose(0, 2, 1)) * (d ** -0.5)
    if mask is not None:
        scores = scores.reshape(b, heads, lq, lk) + mask.astype(ms.float32)
        scores = scores.reshape(b * heads, lq, lk)
    probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    out = ops.bmm(probs, vh)
    return out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3).reshape(b, lq, c)


def attention_in_chunks(q, k, v, heads: int, max_scores: int):
    """`attention` (without mask) holding at most about `max_scores` fp32 scores at once: the queries go in chunks,
    and each query's softmax is its own, so the result is the same. Eager code only: the chunks depend on the
    shapes' values, which a dynamic-shape graph does not know."""
    b, lq, _ = q.shape
    chunk = max(1, max_scores // (b * heads * k.shape[1]))
    if chunk >= lq:
        return attention(q, k, v, heads)
    return ops.cat([attention(q[:, i:i + chunk], k, v, heads) for i in range(0, lq, chunk)], axis=1)


# the scores an eagerly run attention holds at once after `limit_eager_attention_scores` (256 MB in fp32)
EAGER_ATTENTION_SCORES = 2 ** 26


def limit_eager_attention_scores(model: nn.Cell, max_scores: int = EAGER_ATTENTION_SCORES):
    """Bound the score elements every attention cell of `model` holds at once (cells with `max_attention_scores`);
    for models that run eagerly only (see `attention_in_chunks`)."""
    for _, cell in model.cells_and_names():
        if hasattr(cell, "max_attention_scores"):
            cell.max_attention_scores = max_scores


def causal_mask(length: int):
    """(1, 1, L, L) additive mask: 0 on and below the diagonal, a large negative value above it."""
    mask = np.triu(np.full((length, length), -1e9, dtype=np.float32), k=1)
    return ms.Tensor(mask[None, None])
