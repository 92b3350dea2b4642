"""Small building blocks shared by the UNet, the VAE and the text encoders.

They exist for two reasons:
- parameter names: MindSpore's own norm and embedding cells call their parameters `gamma`/`beta`/
  `embedding_table`; checkpoints (torch, SGM, diffusers, HF) call them `weight`/`bias`. Using cells whose
  attribute names are the checkpoint's makes a model's `parameters_and_names()` equal the checkpoint keys,
  so loading needs no per-layer renaming.
- backends: everything here is built from `mindspore.ops` primitives that have CPU, GPU and Ascend kernels
  (the `mint` equivalents mostly have no CPU kernel, see DESIGN.md).
"""

import hashlib
import inspect
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer


class ReusedCell(nn.Cell):
    """Base of a block that a model repeats (transformer blocks, resnets, CLIP layers): graph mode parses its
    `construct` once for all instances of the same structure and inlines the result at each call site.

    MindSpore's `lazy_inline(policy="front")` does this, keyed by the cell's `__init__` arguments. That key misses
    what happens after construction (a LoRA module replacing a layer deep inside, block dims giving one block no
    LoRA, `recompute()`), and a wrong key would silently run one block's graph for another. So the key here is the
    structure itself: every sub-cell's path, class, flags and plain attributes, and every parameter's path, shape,
    dtype and trainability. Measured on the SDXL layout (MindSpore 2.10 CPU): the train step compiles ~2x faster
    and runs faster too (bench/README.md).
    """

    # read by MindSpore's graph compiler: inline the shared graph at the front end (the CPU backend cannot run
    # cell graphs that stay separate); the attribute lazy_inline(policy="front") sets
    no_inline = False
    # attributes that differ between instances without changing the computation (e.g. a LoRA module's name)
    graph_neutral_attributes = ()

    @property
    def cell_init_args(self):
        if not _share_repeated_blocks:
            raise AttributeError("cell_init_args")  # MindSpore then parses the cell as any other
        return f"lazy_inline_{type(self).__name__}_{_graph_generation}_{structure_key(self)}"

    @cell_init_args.setter
    def cell_init_args(self, value):
        raise AttributeError("a ReusedCell's graph key is derived from its structure; it cannot be set")


# Part of every reuse key, renewed before each top-level compile (`new_graph_generation`): MindSpore keeps parsed
# cell graphs by key across compiles, and a graph reused from an earlier compile keeps that compile's input shapes
# (measured, MindSpore 2.10: a Reshape fails, or worse would not), so reuse stays within one compile.
_graph_generation = 0
# Off for a graph with control flow around the blocks (mindone's gradient-accumulation branch): shared block graphs
# there were wired to the wrong inputs (measured, MindSpore 2.10), so each block is parsed on its own
_share_repeated_blocks = True


def new_graph_generation(share_repeated_blocks: bool = True):
    """Call before a top-level graph compiles (a train step, a jitted function, a model called in graph mode)."""
    global _graph_generation, _share_repeated_blocks
    _graph_generation += 1
    _share_repeated_blocks = share_repeated_blocks


class GraphEntry(nn.Cell):
    """Base of a model that may be called as a top-level graph: starts a reuse generation when it compiles."""

    shares_repeated_blocks = True

    def compile(self, *args, **kwargs):
        new_graph_generation(self.shares_repeated_blocks)
        return super().compile(*args, **kwargs)


# attributes MindSpore sets on a cell when it compiles it: bookkeeping, not structure
_COMPILE_BOOKKEEPING = frozenset({"arguments_key", "current_phase", "compile_phase"})


def structure_key(cell: nn.Cell) -> str:
    """Everything about `cell` and its sub-cells that decides the graph its `construct` traces to."""
    parts = []
    for path, sub in cell.cells_and_names():
        ignored = _COMPILE_BOOKKEEPING.union(getattr(sub, "graph_neutral_attributes", ()))
        attributes = sorted((k, _describe(v)) for k, v in vars(sub).items()
                            if not k.startswith("_") and k not in ignored and _describe(v) is not None)
        parts.append((path, type(sub).__qualname__, sorted(sub.get_flags().items()), attributes))
    for path, param in cell.parameters_and_names():
        parts.append((path, tuple(param.shape), str(param.dtype), param.requires_grad))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _describe(value, depth: int = 0):
    """A stable description of an attribute that can change a traced graph: plain values, primitives, functions,
    constant tensors and (two levels deep) plain helper objects such as the loss settings. None for sub-cells and
    parameters (described on their own) and anything else."""
    if isinstance(value, Parameter):
        return None
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_describe(v, depth) for v in value]
        return None if None in items else "(" + ",".join(items) + ")"
    if isinstance(value, ops.Primitive):
        return f"{value.name}{sorted(value.attrs.items())}"
    if inspect.isfunction(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, ms.Tensor):
        data = value.asnumpy()
        return f"tensor{data.dtype}{data.shape}:{hashlib.sha256(data.tobytes()).hexdigest()}"
    if isinstance(value, np.ndarray):
        return f"array{value.dtype}{value.shape}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    if depth < 2 and not isinstance(value, (nn.Cell, type)) and hasattr(value, "__dict__") and not callable(value):
        fields = sorted((k, _describe(v, depth + 1)) for k, v in vars(value).items())
        return f"{type(value).__qualname__}{[f for f in fields if f[1] is not None]}"
    return None


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
        # the ReduceMean primitive, not Tensor.mean: same kernel and results, but graph mode traces Tensor.mean's
        # argument dispatch at every call site, which made the tiny SDXL UNet's compile ~20% slower (measured)
        self.reduce_mean = ops.ReduceMean(keep_dims=True)

    def construct(self, x):
        shape = x.shape
        h = ops.cast(x, ms.float32).reshape(shape[0], self.num_groups, -1)
        mean = self.reduce_mean(h, -1)
        var = self.reduce_mean(ops.square(h - mean), -1)
        h = ((h - mean) / ops.sqrt(var + self.eps)).reshape(shape)
        affine_shape = (1, -1) + (1,) * (len(shape) - 2)
        h = h * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)
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


def causal_mask(length: int):
    """(1, 1, L, L) additive mask: 0 on and below the diagonal, a large negative value above it."""
    mask = np.triu(np.full((length, length), -1e9, dtype=np.float32), k=1)
    return ms.Tensor(mask[None, None])
