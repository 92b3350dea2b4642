"""LoRA for the SD 1.x/2.x and SDXL UNets and text encoders, file-compatible with kohya-ss/sd-scripts'
`networks/lora.py`.

Upstream patches the `forward` of each target Linear/Conv2d. MindSpore's graph mode cannot compile a patched
forward, so here each target `nn.Dense`/`nn.Conv2d` is REPLACED IN PLACE in its parent by a `LoRAModule` that
wraps it (see seed/limitations.md). This happens when the network is built, so any graph compiled afterwards
contains the LoRA layers. Consequences for callers:

- a wrapped layer's parameters are reached through `org_module`: `...attn1.to_q.weight` becomes
  `...attn1.to_q.org_module.weight` in `parameters_and_names()`. `base_state_dict(model)` gives the model's own
  parameters under their checkpoint names again (for full-checkpoint saving or strict loading);
- the models' own parameters are frozen (`requires_grad=False`); only `lora_down`/`lora_up` weights train;
- the network's registered children are the LoRA modules, named `lora_unet_...`/`lora_te1_...`/`lora_te2_...`,
  as upstream's `add_module(lora_name, lora)`; the models themselves are referenced, not registered.

Module names are the layers' paths in the models, as upstream's: an SD 1.x/2.x UNet in diffusers' layout gives
`lora_unet_down_blocks_0_attentions_0_proj_in`, the SDXL UNet in SGM layout `lora_unet_input_blocks_4_1_proj_in`;
one text encoder gives `lora_te_...`, two (SDXL) `lora_te1_...`/`lora_te2_...`. The UNet's layout also decides the
block numbering of block dims and block lr weights (`UNetLayout`: SD's 25 blocks or SDXL's 23).

Inference merging (`create_network_from_weights(..., for_inference=True)`) builds no cells: it returns a
`LoRAMerger` that adds `multiplier * scale * up @ down` into the base weights in place.

Upstream quirks deliberately not reproduced (README material):
- `UNET_TARGET_REPLACE_MODULE += ...` mutated the class attribute, so after one network with conv layers every
  later network in the process also targeted ResNet blocks. Targets here are computed per network.
- loading weights whose `.alpha` differs from the network's kept the old scale while saving the new alpha; here
  alpha is a (non-trainable) parameter and the scale always follows it.
- a file matching none of the network's modules loaded silently (strict=False); here it is an error.
- diffusers-named UNet keys are converted by structure, not by first substring match (upstream's conversion also
  read an uninitialised `found` flag).
- a single number for `down_lr_weight`/`up_lr_weight` was taken as an unknown preset name and silently ignored;
  here it is a one-element list (then filled with 1.0 as any short list), and an unknown preset is an error.
"""

import logging
import math
import re
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import ml_dtypes
import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Uniform, Zero, initializer

from networks import lora_io

logger = logging.getLogger(__name__)

UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
LORA_PREFIX_TEXT_ENCODER1 = "lora_te1"
LORA_PREFIX_TEXT_ENCODER2 = "lora_te2"
ORG_MODULE = "org_module"  # attribute of LoRAModule holding the wrapped layer; appears in parameter paths

BLOCK_LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

KNOWN_NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)

_NUMPY_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.bfloat16: ml_dtypes.bfloat16}


class LoRAModule(nn.Cell):
    """`org(x) + lora_up(lora_down(x)) * multiplier * alpha / dim` around an `nn.Dense` or `nn.Conv2d`.

    Conv: lora_down has the original kernel, stride and padding; lora_up is 1x1. lora_down is initialised as
    torch's kaiming_uniform_(a=sqrt(5)), lora_up with zeros, so a fresh LoRA leaves the output unchanged.
    `multiplier` and `alpha` are non-trainable parameters: changing them needs no recompilation.
    Dropouts apply only in training mode, with MindSpore random ops, so every step draws anew in graph mode:
    `dropout` on the lora_down output, `rank_dropout` per sample and rank (rescaled by 1/(1-p)), and
    `module_dropout` dropping the whole LoRA branch for a step (as a 0/1 factor, not Python control flow).
    """

    def __init__(self, lora_name: str, org_module: nn.Cell, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: Optional[float] = 1.0, dropout: Optional[float] = None, rank_dropout: Optional[float] = None,
                 module_dropout: Optional[float] = None):
        super().__init__()
        self.lora_name = lora_name
        self.graph_neutral_attributes = ("lora_name",)  # one graph serves every module of a repeated block
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, nn.Conv2d):
            in_dim = org_module.in_channels
            fan_in = in_dim * org_module.kernel_size[0] * org_module.kernel_size[1]
            self.lora_down = nn.Conv2d(
                in_dim, self.lora_dim, org_module.kernel_size, stride=org_module.stride, pad_mode=org_module.pad_mode,
                padding=org_module.padding, has_bias=False, weight_init=_kaiming_uniform(
                    (self.lora_dim, in_dim) + tuple(org_module.kernel_size), fan_in))
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, has_bias=False,
                                     weight_init=initializer(Zero(), (org_module.out_channels, self.lora_dim, 1, 1)))
        elif isinstance(org_module, nn.Dense):
            if org_module.activation_flag:
                raise TypeError(f"{lora_name}: cannot wrap an nn.Dense with a built-in activation")
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Dense(in_dim, self.lora_dim, has_bias=False,
                                      weight_init=_kaiming_uniform((self.lora_dim, in_dim), in_dim))
            self.lora_up = nn.Dense(self.lora_dim, out_dim, has_bias=False,
                                    weight_init=initializer(Zero(), (out_dim, self.lora_dim)))
        else:
            raise TypeError(f"{lora_name}: LoRA wraps nn.Dense or nn.Conv2d, got {type(org_module).__name__}")

        alpha = float(self.lora_dim) if alpha is None or float(alpha) == 0 else float(alpha)
        self.alpha = Parameter(Tensor(alpha, ms.float32), name="alpha", requires_grad=False)
        self.multiplier = Parameter(Tensor(float(multiplier), ms.float32), name="multiplier", requires_grad=False)
        self.dropout = _probability("dropout", dropout)
        self.rank_dropout = _probability("rank_dropout", rank_dropout)
        self.module_dropout = _probability("module_dropout", module_dropout)
        self.org_module = org_module
        # A Dense site runs its three weights directly with nn.Dense's own kernels (same results): calling three
        # Dense cells per site, each traced as its own graph, about doubled the compile time of the tiny SDXL train
        # step and tripled its forward time on CPU (measured, MindSpore 2.10)
        self.is_dense = isinstance(org_module, nn.Dense)
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    @property
    def scale(self) -> float:
        return float(self.alpha.asnumpy()) / self.lora_dim

    def lora_parameters(self) -> List[Parameter]:
        """The parameters this module adds (not those of the wrapped layer)."""
        return [self.lora_down.weight, self.lora_up.weight, self.alpha, self.multiplier]

    def construct(self, x):
        if self.is_dense:
            return self._dense_forward(x)
        y = self.org_module(x)
        lx = self.lora_down(x.astype(self.lora_down.weight.dtype))
        scale = self.alpha / self.lora_dim
        if self.training:
            if self.dropout is not None:
                lx = ops.dropout(lx, p=self.dropout)
            if self.rank_dropout is not None:
                lx = lx * self._rank_mask(lx)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank were reduced
        lx = self.lora_up(lx) * (self.multiplier * scale)
        if self.training and self.module_dropout is not None:
            lx = lx * (ops.rand(1) >= self.module_dropout).astype(lx.dtype)
        return y + lx.astype(y.dtype)

    def _dense_forward(self, x):
        """`construct` for a wrapped nn.Dense, with nn.Dense's own kernels on (N, features) rows."""
        org = self.org_module
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = self.matmul_t(x, org.weight)
        if org.has_bias:
            y = self.bias_add(y, org.bias)
        lx = self.matmul_t(x.astype(self.lora_down.weight.dtype), self.lora_down.weight)
        scale = self.alpha / self.lora_dim
        if self.training:
            if self.dropout is not None:
                lx = ops.dropout(lx, p=self.dropout)
            if self.rank_dropout is not None:
                lx = lx.reshape(shape[:-1] + (self.lora_dim,))
                lx = (lx * self._rank_mask(lx)).reshape(-1, self.lora_dim)
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank were reduced
        lx = self.matmul_t(lx, self.lora_up.weight) * (self.multiplier * scale)
        if self.training and self.module_dropout is not None:
            lx = lx * (ops.rand(1) >= self.module_dropout).astype(lx.dtype)
        y = y + lx.astype(y.dtype)
        return y.reshape(shape[:-1] + (y.shape[-1],))

    def _rank_mask(self, lx):
        """(batch, rank) keep-mask broadcast to lx: (B, dim), (B, L, dim) or conv's (B, dim, H, W)."""
        batch = lx.shape[0]
        keep = (ops.rand(batch, self.lora_dim) > self.rank_dropout).astype(lx.dtype)
        if len(lx.shape) == 3:
            keep = keep.reshape(batch, 1, self.lora_dim)
        elif len(lx.shape) == 4:
            keep = keep.reshape(batch, self.lora_dim, 1, 1)
        return keep


def _kaiming_uniform(shape, fan_in: int):
    # torch's kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(fan_in)
    return initializer(Uniform(1.0 / math.sqrt(fan_in)), shape, ms.float32)


def _probability(name: str, value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def lora_delta(down: np.ndarray, up: np.ndarray, scale: float) -> np.ndarray:
    """`scale * up @ down` in the base weight's layout (Dense [out, in]; Conv [out, in, kh, kw])."""
    down, up = down.astype(np.float32), up.astype(np.float32)
    if down.ndim == 2:
        return scale * (up @ down)
    # conv: lora_up is 1x1, so the composition is a per-tap matmul (upstream writes it as a conv of the weights)
    return scale * np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)


# ------------------------------------------------------------------------------------------------ target search

@dataclass
class _Site:
    """A Dense/Conv2d (or an already wrapping LoRAModule) and where it sits."""
    lora_name: str
    parent: nn.Cell
    key: str
    cell: nn.Cell

    @property
    def layer(self) -> nn.Cell:
        return self.cell.org_module if isinstance(self.cell, LoRAModule) else self.cell

    @property
    def is_conv3x3(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and tuple(self.layer.kernel_size) != (1, 1)


def _find_sites(root: nn.Cell, prefix: str, target_classes: Sequence[str]) -> List[_Site]:
    """Every Dense/Conv2d inside a cell whose class name is a target, in registration order (as upstream)."""
    sites = []

    def collect(cell, path):
        for key, child in cell.name_cells().items():
            child_path = f"{path}.{key}"
            if isinstance(child, (nn.Dense, nn.Conv2d, LoRAModule)):
                sites.append(_Site(f"{prefix}.{child_path}".replace(".", "_"), cell, key, child))
            else:
                collect(child, child_path)

    def visit(cell, path):
        for key, child in cell.name_cells().items():
            child_path = f"{path}.{key}" if path else key
            if type(child).__name__ in target_classes:
                collect(child, child_path)
            else:
                visit(child, child_path)

    visit(root, "")
    return sites


def _as_list(text_encoders) -> list:
    if text_encoders is None:
        return []
    return list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]


def _text_encoder_sites(text_encoders) -> List[_Site]:
    """Sites of one (`lora_te_...`) or two (SDXL: `lora_te1_...`, `lora_te2_...`) text encoders."""
    text_encoders = _as_list(text_encoders)
    if len(text_encoders) > 2:
        raise ValueError(f"expected one or two text encoders, got {len(text_encoders)}")
    prefixes = [LORA_PREFIX_TEXT_ENCODER] if len(text_encoders) == 1 else [LORA_PREFIX_TEXT_ENCODER1,
                                                                           LORA_PREFIX_TEXT_ENCODER2]
    sites = []
    for prefix, text_encoder in zip(prefixes, text_encoders):
        sites += _find_sites(text_encoder, prefix, TEXT_ENCODER_TARGET_REPLACE_MODULE)
    return sites


def _unet_sites(unet, with_conv: bool) -> List[_Site]:
    if unet is None:
        return []
    targets = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if with_conv else ())
    return _find_sites(unet, LORA_PREFIX_UNET, targets)


def _models(text_encoders, unet) -> list:
    return _as_list(text_encoders) + ([unet] if unet is not None else [])


def _parameter_prefix(layer: nn.Cell) -> str:
    """`a.b.to_q.` for a layer whose weight is named `a.b.to_q.weight`."""
    name = layer.weight.name
    return name[:len(name) - len("weight")]


def _rename_parameters(cell: nn.Cell, prefix: str):
    for name, param in cell.parameters_and_names():
        param.name = prefix + name


def _place(parent: nn.Cell, key: str, cell: nn.Cell, prefix: str):
    """Put `cell` in `parent`'s slot `key`, its parameters named `prefix + path` (unique in the whole model).

    Assigning a cell renames its parameters relative to the parent only, and a SequentialCell infers that
    prefix from its children's names, so the full names are set both before and after. A SequentialCell
    also caches its children: indexed slots must go through __setitem__.
    """
    _rename_parameters(cell, prefix)
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(key)] = cell
    else:
        setattr(parent, key, cell)
    _rename_parameters(cell, prefix)


def original_parameter_name(name: str) -> str:
    """Checkpoint name of a parameter path inside a model with LoRA layers in place (drops `.org_module`)."""
    return name.replace(f".{ORG_MODULE}.", ".")


def base_state_dict(model: nn.Cell) -> Dict[str, Parameter]:
    """The model's own parameters under their checkpoint names, whether or not LoRA layers are in place."""
    lora_ids = set()
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRAModule):
            lora_ids.update(id(p) for p in cell.lora_parameters())
    return {original_parameter_name(name): param for name, param in model.parameters_and_names()
            if id(param) not in lora_ids}


@dataclass(frozen=True)
class UNetLayout:
    """How upstream numbers a UNet's blocks for block dims (`block_dims`, ...) and block lr weights (`*_lr_weight`).

    SD 1.x/2.x (diffusers names, 25 blocks): 0 = conv_in (never LoRA), 1-11 = down_blocks (3 per level: resnet or
    attention j of level i is 3i+j+1, its downsampler 3i+3), 12 = mid_block, 13-24 = up_blocks (3i+j+13); the lr
    weights are down(12) + mid(1) + up(12). SDXL (SGM names, 23 blocks): 0 = time/label embedding (never LoRA),
    1-9 = input_blocks 0-8, 10-12 = middle_block 0-2, 13-21 = output_blocks 0-8, 22 = out (never LoRA); the lr
    weights are 1 + down(9) + mid(3) + up(9) + 1. `sgm_names`: the names are SGM's, so diffusers-named files are
    converted when they load.
    """

    name: str
    num_blocks: int  # down (= up) blocks with an lr weight each
    num_mid_blocks: int
    sgm_names: bool  # SDXL's SGM names; its blocks 0 and last, outside down/mid/up, have lr weight 1.0

    @property
    def num_total_blocks(self) -> int:
        return 2 * self.num_blocks + self.num_mid_blocks + (2 if self.sgm_names else 0)

    def block_index(self, lora_name: str) -> int:
        """This layout's block of a UNet LoRA name; -1 for text encoder or unknown names."""
        if not lora_name.startswith(LORA_PREFIX_UNET + "_"):
            return -1
        name = lora_name[len(LORA_PREFIX_UNET) + 1:]
        if self.sgm_names:
            for stage, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
                if name.startswith(stage):
                    return first + int(name[len(stage):].split("_")[0])
            if name.startswith(("time_embed_", "label_emb_")):
                return 0
            return self.num_total_blocks - 1 if name.startswith("out_") else -1
        m = _DIFFUSERS_BLOCK.match(name)
        if m:
            side, level, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            slot = 3 * level + (2 if kind in ("downsamplers", "upsamplers") else index)
            return 1 + slot if side == "down" else self.num_blocks + 1 + slot
        return self.num_blocks if name.startswith("mid_block_") else -1


_DIFFUSERS_BLOCK = re.compile(r"^(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
SD_LAYOUT = UNetLayout("SD 1.x/2.x", num_blocks=12, num_mid_blocks=1, sgm_names=False)
SDXL_LAYOUT = UNetLayout("SDXL", num_blocks=9, num_mid_blocks=3, sgm_names=True)


def unet_layout(text_encoders, unet) -> UNetLayout:
    """SDXL's for a UNet in SGM layout (`input_blocks`), SD's for one in diffusers layout (`down_blocks`); without
    a UNet, by the number of text encoders."""
    if unet is not None:
        return SDXL_LAYOUT if hasattr(unet, "input_blocks") else SD_LAYOUT
    return SDXL_LAYOUT if len(_as_list(text_encoders)) == 2 else SD_LAYOUT


def get_block_index(lora_name: str, layout: UNetLayout = SDXL_LAYOUT) -> int:
    """Index of a UNet LoRA name in `layout`'s blocks; -1 for text encoder or unknown names."""
    return layout.block_index(lora_name)


# ------------------------------------------------------------------------------------------------ the network

class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]


class LoRANetwork(nn.Cell):
    """LoRA modules placed in the text encoders and the UNet (see the module docstring).

    dims: `lora_dim`/`alpha` for Dense and 1x1 conv layers, `conv_lora_dim`/`conv_alpha` for 3x3 convs (the
    ResNet/Down/Upsample blocks are targeted only when a conv dim is given); `block_dims`/`block_alphas`
    (and `conv_block_*`), one entry per block of the UNet's layout (`unet_layout`: 25 for SD, 23 for SDXL),
    override them per UNet block; `modules_dim`/`modules_alpha` (from a
    file) name every module explicitly. A dim of 0 or None skips the layer.
    """

    def __init__(self, text_encoders, unet, multiplier: float = 1.0, lora_dim: int = 4, alpha: float = 1.0,
                 dropout=None, rank_dropout=None, module_dropout=None, conv_lora_dim=None, conv_alpha=None,
                 block_dims=None, block_alphas=None, conv_block_dims=None, conv_block_alphas=None,
                 modules_dim: Optional[Dict[str, int]] = None, modules_alpha: Optional[Dict[str, float]] = None):
        # no auto prefix: registering the LoRA modules must not rename their (already unique) parameters
        super().__init__(auto_prefix=False)
        self.multiplier = float(multiplier)
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self.block_lr_weight = None
        self._sites: Dict[str, _Site] = {}
        self._model_ids = ([id(m) for m in _as_list(text_encoders)], id(unet) if unet is not None else None)
        self.layout = unet_layout(text_encoders, unet)

        def dim_and_alpha(site: _Site, is_unet: bool):
            if modules_dim is not None:
                return modules_dim.get(site.lora_name), modules_alpha.get(site.lora_name)
            if is_unet and block_dims is not None:
                index = self.layout.block_index(site.lora_name)
                if not site.is_conv3x3:
                    return block_dims[index], block_alphas[index]
                if conv_block_dims is not None:
                    return conv_block_dims[index], conv_block_alphas[index]
                return None, None
            if not site.is_conv3x3:
                return lora_dim, alpha
            return conv_lora_dim, conv_alpha

        def create(sites: List[_Site], is_unet: bool) -> List[LoRAModule]:
            loras, skipped = [], []
            for site in sites:
                if isinstance(site.cell, LoRAModule):
                    raise ValueError(f"{site.lora_name} already has a LoRA layer (from another network); merge that "
                                     "one into the weights first (create_network_from_weights(for_inference=True))")
                dim, module_alpha = dim_and_alpha(site, is_unet)
                if not dim:
                    if modules_dim is None and (not site.is_conv3x3 or conv_lora_dim or conv_block_dims):
                        skipped.append(site.lora_name)
                    continue
                prefix = _parameter_prefix(site.cell)  # before wrapping renames the layer's parameters
                lora = LoRAModule(site.lora_name, site.cell, self.multiplier, dim, module_alpha, dropout,
                                  rank_dropout, module_dropout)
                loras.append(self._install(site, lora, prefix))
            if skipped:
                logger.warning(f"{len(skipped)} LoRA modules skipped because their dim (rank) or block lr is 0: "
                               + ", ".join(skipped))
            return loras

        for model in _models(text_encoders, unet):  # freeze before the LoRA parameters exist
            for param in model.get_parameters():
                param.requires_grad = False

        self.text_encoder_loras = create(_text_encoder_sites(text_encoders), is_unet=False)
        logger.info(f"create LoRA for Text Encoder: {len(self.text_encoder_loras)} modules.")
        with_conv = modules_dim is not None or bool(conv_lora_dim) or conv_block_dims is not None
        self.unet_loras = create(_unet_sites(unet, with_conv), is_unet=True)
        logger.info(f"create LoRA for U-Net: {len(self.unet_loras)} modules.")

    def _install(self, site: _Site, lora: LoRAModule, prefix: str) -> LoRAModule:
        if site.lora_name in self._sites:
            raise ValueError(f"duplicated LoRA name: {site.lora_name}")
        _place(site.parent, site.key, lora, prefix)
        self.insert_child_to_cell(site.lora_name, lora)
        self._sites[site.lora_name] = site
        return lora

    def _uninstall(self, lora: LoRAModule):
        site = self._sites.pop(lora.lora_name)
        prefix = _parameter_prefix(lora.org_module)[:-len(ORG_MODULE) - 1]
        _place(site.parent, site.key, lora.org_module, prefix)
        delattr(self, lora.lora_name)

    @property
    def loras(self) -> List[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Keep the LoRA layers of only the text encoders or only the UNet (`--network_train_*_only`).

        Upstream's signature, different meaning: the layers were already placed in the models given when the network
        was built (`text_encoders`/`unet`, if passed, must be those); this takes the disabled part out again
        (restoring the original layers), so it trains nothing there and saves no keys for it. Call it before
        compiling.
        """
        if (text_encoders is not None and [id(m) for m in _as_list(text_encoders)] != self._model_ids[0]) or (
                unet is not None and id(unet) != self._model_ids[1]):
            raise ValueError("apply_to: these are not the models the network was built on (its LoRA layers are "
                             "placed in those at construction)")
        if not apply_text_encoder:
            for lora in self.text_encoder_loras:
                self._uninstall(lora)
            self.text_encoder_loras = []
        if not apply_unet:
            for lora in self.unet_loras:
                self._uninstall(lora)
            self.unet_loras = []
        logger.info(f"LoRA enabled for {len(self.text_encoder_loras)} text encoder and "
                    f"{len(self.unet_loras)} U-Net modules")

    def set_multiplier(self, multiplier: float):
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier.set_data(Tensor(self.multiplier, ms.float32))

    def get_trainable_params(self) -> List[Parameter]:
        params = []
        for lora in self.loras:
            params += [lora.lora_down.weight, lora.lora_up.weight]
        return params

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_block_lr_weight(self, block_lr_weight: Optional[List[float]]):
        self.block_lr_weight = block_lr_weight

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """(param_groups, lr_descriptions) as upstream.

        Groups are `{"params": [...], "lr": float}`. Text encoders use `text_encoder_lr` (its first value when a
        list, as upstream: one lr for both), the UNet `unet_lr`, both falling back to `default_lr`; in block-lr
        mode the UNet has one group per block (`unet_block{i}`) with lr times the block's weight. With LoRA+, the
        lora_up weights form a separate `... plus` group with lr times the ratio. A group whose lr is 0 or None
        is dropped (its weights stay as they are but are still saved).
        """
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        groups, descriptions = [], []

        def assemble(loras, lr, ratio, label):
            plain, plus = [], []
            for lora in loras:
                plain.append(lora.lora_down.weight)
                (plus if ratio is not None else plain).append(lora.lora_up.weight)
            for params, is_plus in ((plain, False), (plus, True)):
                if not params:
                    continue
                group_lr = None if lr is None else (lr * ratio if is_plus else lr)
                if not group_lr:
                    logger.info(f"lr of '{label}' is {group_lr}: its parameters are not trained")
                    continue
                groups.append({"params": params, "lr": group_lr})
                descriptions.append(label + (" plus" if is_plus else ""))

        if self.text_encoder_loras:
            assemble(self.text_encoder_loras, text_encoder_lr if text_encoder_lr is not None else default_lr,
                     self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio, "textencoder")
        if self.unet_loras:
            base_lr = unet_lr if unet_lr is not None else default_lr
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            if self.block_lr_weight is None:
                assemble(self.unet_loras, base_lr, ratio, "unet")
            else:
                by_block: Dict[int, List[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_block.setdefault(self.layout.block_index(lora.lora_name), []).append(lora)
                for index, block_loras in by_block.items():
                    lr = None if base_lr is None else base_lr * self.block_lr_weight[index]
                    assemble(block_loras, lr, ratio, f"unet_block{index}")
        return groups, descriptions

    def apply_max_norm_regularization(self, max_norm_value: float):
        """Scale down every module whose `scale * up @ down` has a Frobenius norm above `max_norm_value`.

        Up and down are both multiplied by sqrt(ratio). Returns (keys_scaled, mean_norm, max_norm) of the
        norms after scaling, as upstream (`--scale_weight_norms`).
        """
        norms, keys_scaled = [], 0
        for lora in self.loras:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            norm = float(np.linalg.norm(lora_delta(down.asnumpy(), up.asnumpy(), lora.scale)))
            # upstream clamps the norm from below at max_norm / 2 before taking the ratio
            clamped = max(norm, max_norm_value / 2)
            ratio = min(clamped, max_norm_value) / clamped
            if ratio != 1:
                keys_scaled += 1
                factor = ratio ** 0.5
                for param in (down, up):
                    param.set_data(Tensor(param.asnumpy() * factor, param.dtype))
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    def _named_lora_parameters(self) -> Dict[str, Parameter]:
        named = {}
        for lora in self.loras:
            named[f"{lora.lora_name}.{lora_io.LORA_DOWN}"] = lora.lora_down.weight
            named[f"{lora.lora_name}.{lora_io.LORA_UP}"] = lora.lora_up.weight
            named[f"{lora.lora_name}.{lora_io.ALPHA}"] = lora.alpha
        return named

    def lora_state_dict(self, dtype=None) -> Dict[str, np.ndarray]:
        """Kohya's keys -> numpy arrays in torch layout (what `save_weights` writes), optionally cast to `dtype`."""
        np_dtype = _numpy_dtype(dtype)
        state = {}
        for key, param in self._named_lora_parameters().items():
            value = param.asnumpy()
            state[key] = value.astype(np_dtype) if np_dtype is not None else value
        return state

    def save_weights(self, file: str, dtype=None, metadata: Optional[Dict[str, str]] = None):
        """Write the LoRA as Kohya's `.safetensors` (metadata + sshs hashes); dtype: None, or fp32/fp16/bf16 as a
        MindSpore or numpy dtype (alpha included, as upstream)."""
        lora_io.write_lora_file(file, self.lora_state_dict(dtype), metadata or {})

    def load_weights(self, file: str) -> LoadResult:
        """Load a LoRA file into the live modules (`--network_weights`); missing/unexpected keys are logged and
        returned, a shape mismatch or a file matching no key at all is an error."""
        tensors, _ = lora_io.read_lora_file(file)
        if self.layout.sgm_names:
            tensors, _ = lora_io.convert_diffusers_to_sgm(tensors)
        params = self._named_lora_parameters()
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        matched = [key for key in params if key in tensors]
        if tensors and not matched:
            raise ValueError(f"{file}: none of its {len(tensors)} keys belongs to this network; it looks like "
                             f"{lora_io.describe_lora_names(tensors)}")
        values = {}
        for key in matched:
            value = np.asarray(tensors[key], dtype=np.float32)
            param = params[key]
            if key.endswith("." + lora_io.ALPHA) and value.size == 1:
                value = value.reshape(())
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{file}: shape mismatch for '{key}': file {tuple(value.shape)}, "
                                 f"network {tuple(param.shape)}")
            values[key] = value
        for key, value in values.items():
            params[key].set_data(Tensor(value, params[key].dtype))
        if missing:
            logger.warning(f"{file}: {len(missing)} network keys not in the file (left as they were): "
                           + ", ".join(missing))
        if unexpected:
            logger.warning(f"{file}: {len(unexpected)} file keys not in the network (ignored): " + ", ".join(unexpected))
        logger.info(f"loaded {len(matched)} LoRA tensors from {file}")
        return LoadResult(missing, unexpected)


def _numpy_dtype(dtype):
    if dtype is None:
        return None
    if dtype in _NUMPY_DTYPES:
        return _NUMPY_DTYPES[dtype]
    return np.dtype(dtype).type


# ------------------------------------------------------------------------------------------------ merging

class LoRAMerger:
    """Adds a LoRA file's deltas into the base weights in place (inference; several files merge one after another).

    Built by `create_network_from_weights(..., for_inference=True)`. Creates no cells, so the merged models
    compile and run exactly as without LoRA.
    """

    def __init__(self, text_encoders, unet, multiplier: float, modules_dim: Dict[str, int]):
        self.multiplier = float(multiplier)
        sites = _text_encoder_sites(text_encoders) + _unet_sites(unet, with_conv=True)
        self.targets = {site.lora_name: site.layer for site in sites if site.lora_name in modules_dim}

    def set_multiplier(self, multiplier: float):
        self.multiplier = float(multiplier)

    def merge_to(self, weights_sd: Dict[str, np.ndarray]):
        """weight += multiplier * alpha / dim * up @ down for every module of `weights_sd` that has a target.

        Every module is checked first (from the down/up shapes), so a file that does not fit changes no weight; then
        one module's delta exists at a time (all deltas at once are a second fp32 UNet: 12 GB at SDXL size)."""
        dims, alphas = lora_io.modules_dims_and_alphas(weights_sd)
        merges = []
        for name, layer in self.targets.items():
            if name not in dims:
                continue
            down_key, up_key = f"{name}.{lora_io.LORA_DOWN}", f"{name}.{lora_io.LORA_UP}"
            if up_key not in weights_sd:
                raise ValueError(f"LoRA weights have '{down_key}' but no '{up_key}'")
            down_shape, up_shape = tuple(weights_sd[down_key].shape), tuple(weights_sd[up_key].shape)
            if up_shape[1:2] != down_shape[:1]:
                raise ValueError(f"{name}: lora_up {up_shape} does not fit lora_down {down_shape}")
            # lora_delta's result: up's rows by down's input (and kernel) dimensions
            delta_shape = up_shape[:1] + down_shape[1:]
            if delta_shape != tuple(layer.weight.shape):
                raise ValueError(f"{name}: the LoRA's update has shape {delta_shape}, the model weight "
                                 f"{tuple(layer.weight.shape)}")
            merges.append((layer.weight, weights_sd[down_key], weights_sd[up_key], alphas[name] / dims[name]))
        for weight, down, up, scale in merges:
            merged = weight.asnumpy().astype(np.float32)  # a copy: asnumpy() shares the parameter's memory
            merged += self.multiplier * lora_delta(down, up, scale)
            weight.set_data(Tensor(merged, weight.dtype))
            del merged  # now, not when the next module's copy replaces it
        logger.info(f"merged {len(merges)} LoRA modules with multiplier {self.multiplier}")


# ------------------------------------------------------------------------------------------------ network_args

def _check_network_args(network_args: dict):
    unknown = sorted(set(network_args) - set(KNOWN_NETWORK_ARGS))
    if unknown:
        raise ValueError(f"unknown network_args for networks.lora: {', '.join(unknown)}; "
                         f"known: {', '.join(KNOWN_NETWORK_ARGS)}")


def _typed_arg(network_args: dict, name: str, cast):
    value = network_args.get(name)
    if value is None:
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args {name}={value!r}: expected {'an integer' if cast is int else 'a number'}")


def _parse_list(name: str, value, cast, layout: UNetLayout) -> list:
    length = layout.num_total_blocks
    try:
        values = [cast(v) for v in str(value).split(",")]
    except ValueError:
        raise ValueError(f"network_args {name}={value!r}: expected {length} comma-separated numbers")
    if len(values) != length:
        raise ValueError(f"network_args {name} must have {length} elements ({layout.name} blocks), got {len(values)}")
    return values


def get_block_dims_and_alphas(block_dims, block_alphas, network_dim, network_alpha, conv_block_dims,
                              conv_block_alphas, conv_dim, conv_alpha, layout: UNetLayout = SDXL_LAYOUT):
    """Per-block (dims, alphas, conv_dims, conv_alphas), one entry per block of `layout`; unspecified ones use the
    global values (conv ones stay None when neither conv_block_dims nor conv_dim is given)."""
    n = layout.num_total_blocks
    dims = _parse_list("block_dims", block_dims, int, layout) if block_dims is not None else [network_dim] * n
    alphas = (_parse_list("block_alphas", block_alphas, float, layout) if block_alphas is not None
              else [network_alpha] * n)
    if conv_block_dims is not None:
        conv_dims = _parse_list("conv_block_dims", conv_block_dims, int, layout)
        conv_alphas = (_parse_list("conv_block_alphas", conv_block_alphas, float, layout)
                       if conv_block_alphas is not None else [conv_alpha if conv_alpha is not None else 1.0] * n)
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha] * n
    else:
        conv_dims = conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas


def _lr_weight_list(name: str, value, length: int, allow_preset: bool) -> List[float]:
    text = str(value).strip()
    preset, _, base = text.partition("+")
    if allow_preset and preset in BLOCK_LR_PRESETS:
        base = float(base) if base else 0.0
        positions = [i / (length - 1) for i in range(length)]
        values = {"cosine": [math.sin(math.pi * p / 2) for p in reversed(positions)],
                  "sine": [math.sin(math.pi * p / 2) for p in positions],
                  "linear": positions,
                  "reverse_linear": list(reversed(positions)),
                  "zeros": [0.0] * length}[preset]
        return [v + base for v in values]
    try:
        values = [float(v) if v.strip() else 0.0 for v in text.split(",")]  # empty entries are 0, as upstream
    except ValueError:
        hint = f" or a preset ({', '.join(BLOCK_LR_PRESETS)}, optionally '+base')" if allow_preset else ""
        raise ValueError(f"network_args {name}={text!r}: expected up to {length} comma-separated numbers{hint}")
    if len(values) != length:
        logger.warning(f"{name} has {len(values)} values for {length} blocks: "
                       + ("extra values are ignored" if len(values) > length else "missing ones are 1.0"))
    return (values + [1.0] * length)[:length]


def get_block_lr_weight(down_lr_weight, mid_lr_weight, up_lr_weight, zero_threshold: float = 0.0,
                        layout: UNetLayout = SDXL_LAYOUT):
    """The per-block lr weights of `layout`, or None when none is given: SD's 25 `down(12) + mid(1) + up(12)`,
    SDXL's 23 `[1] + down(9) + mid(3) + up(9) + [1]`.

    Weights at or below `zero_threshold` become 0 (those blocks get no LoRA at all)."""
    if down_lr_weight is None and mid_lr_weight is None and up_lr_weight is None:
        return None

    def part(name, value, length, allow_preset):
        if value is None:
            return [1.0] * length
        values = _lr_weight_list(name, value, length, allow_preset)
        return [w if w > zero_threshold else 0.0 for w in values]

    weights = (part("down_lr_weight", down_lr_weight, layout.num_blocks, True)
               + part("mid_lr_weight", mid_lr_weight, layout.num_mid_blocks, False)
               + part("up_lr_weight", up_lr_weight, layout.num_blocks, True))
    if layout.sgm_names:
        weights = [1.0] + weights + [1.0]  # the embeddings and out, which hold no LoRA
    logger.info(f"block lr weights: {weights}")
    return weights


def parse_block_lr_kwargs(network_args: dict, layout: UNetLayout = SDXL_LAYOUT) -> Optional[List[float]]:
    return get_block_lr_weight(network_args.get("down_lr_weight"), network_args.get("mid_lr_weight"),
                               network_args.get("up_lr_weight"),
                               _typed_arg(network_args, "block_lr_zero_threshold", float) or 0.0, layout)


# ------------------------------------------------------------------------------------------------ factories

def create_network(multiplier: float, network_dim: Optional[int], network_alpha: Optional[float], vae, text_encoders,
                   unet, neuron_dropout: Optional[float] = None, **network_args) -> LoRANetwork:
    """Build a LoRA network for training, placing its layers in the models now (`vae` is unused, as upstream).

    `network_args` are `--network_args` values (strings or numbers): conv_dim, conv_alpha, rank_dropout,
    module_dropout, block_dims, block_alphas, conv_block_dims, conv_block_alphas, down/mid/up_lr_weight,
    block_lr_zero_threshold, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, and
    `dropout` (the trainer's copy of --network_dropout; neuron_dropout wins).
    """
    _check_network_args(network_args)
    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = _typed_arg(network_args, "conv_dim", int)
    conv_alpha = _typed_arg(network_args, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    if neuron_dropout is None:
        neuron_dropout = _typed_arg(network_args, "dropout", float)

    layout = unet_layout(text_encoders, unet)
    block_lr_weight = parse_block_lr_kwargs(network_args, layout)
    block_dims = block_alphas = conv_block_dims = conv_block_alphas = None
    if network_args.get("block_dims") is not None or block_lr_weight is not None:
        block_dims, block_alphas, conv_block_dims, conv_block_alphas = get_block_dims_and_alphas(
            network_args.get("block_dims"), network_args.get("block_alphas"), network_dim, network_alpha,
            network_args.get("conv_block_dims"), network_args.get("conv_block_alphas"), conv_dim, conv_alpha, layout)
        if block_lr_weight is not None:  # a block with lr weight 0 gets no LoRA at all
            for i, weight in enumerate(block_lr_weight):
                if weight == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0

    network = LoRANetwork(
        text_encoders, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha, dropout=neuron_dropout,
        rank_dropout=_typed_arg(network_args, "rank_dropout", float),
        module_dropout=_typed_arg(network_args, "module_dropout", float),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha, block_dims=block_dims, block_alphas=block_alphas,
        conv_block_dims=conv_block_dims, conv_block_alphas=conv_block_alphas)

    ratios = [_typed_arg(network_args, k, float) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    if block_lr_weight is not None:
        network.set_block_lr_weight(block_lr_weight)
    return network


def create_network_from_weights(multiplier: float, file: Optional[str], vae, text_encoders, unet,
                                weights_sd: Optional[Dict[str, np.ndarray]] = None, for_inference: bool = False,
                                **network_args):
    """(network, weights_sd) with one module per module of a LoRA file, dims and alphas taken from the file.

    `weights_sd` (numpy arrays under Kohya's keys) replaces reading `file`. For an SDXL UNet, diffusers-named UNet
    keys are renamed to SGM names first (the returned `weights_sd` has the new names). `for_inference=False` gives a trainable
    `LoRANetwork` (for --dim_from_weights; load the weights with `load_weights`); `for_inference=True` gives a
    `LoRAMerger` whose `merge_to(weights_sd)` adds the LoRA into the base weights. A file none of whose modules
    fits the models is an error; partly matching files log the modules that found no layer.
    """
    _check_network_args(network_args)
    source = file if file is not None else "weights_sd"
    if weights_sd is None:
        weights_sd, _ = lora_io.read_lora_file(file)
    layout = unet_layout(text_encoders, unet)
    if layout.sgm_names:
        weights_sd, not_converted = lora_io.convert_diffusers_to_sgm(weights_sd)
        if not_converted:
            logger.warning(f"{source}: {len(not_converted)} diffusers-named UNet modules have no SGM counterpart: "
                           + ", ".join(not_converted))
    modules_dim, modules_alpha = lora_io.modules_dims_and_alphas(weights_sd)
    if not modules_dim:
        raise ValueError(f"{source}: no '<name>.lora_down.weight' keys; it looks like "
                         f"{lora_io.describe_lora_names(weights_sd)}")

    if for_inference:
        network = LoRAMerger(text_encoders, unet, multiplier, modules_dim)
        matched = set(network.targets)
    else:
        network = LoRANetwork(text_encoders, unet, multiplier=multiplier, modules_dim=modules_dim,
                              modules_alpha=modules_alpha)
        matched = {lora.lora_name for lora in network.loras}
        block_lr_weight = parse_block_lr_kwargs(network_args, layout)
        if block_lr_weight is not None:
            network.set_block_lr_weight(block_lr_weight)

    unmatched = sorted(set(modules_dim) - matched)
    if not matched:
        raise ValueError(f"{source}: none of its {len(modules_dim)} LoRA modules matches a layer of the given models; "
                         f"it looks like {lora_io.describe_lora_names(modules_dim)}. First modules: "
                         + ", ".join(unmatched[:5]))
    if unmatched:
        logger.warning(f"{source}: {len(unmatched)} LoRA modules match no layer and are ignored: " + ", ".join(unmatched))
    return network, weights_sd
