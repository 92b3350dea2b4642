"""The SD 1.x / 2.x UNet's state-dict conversion between the LDM (single-file checkpoint) and diffusers layouts.

LDM (`model.diffusion_model.*`, prefix stripped here) numbers its blocks flat; diffusers nests them by level.
With n = layers_per_block and L levels (SD: n = 2, L = 4), one table of block paths covers both directions:

    LDM                                     diffusers
    time_embed.{0,2}                        time_embedding.linear_{1,2}
    input_blocks.0.0                        conv_in
    input_blocks.{(n+1)i + j + 1}.0         down_blocks.{i}.resnets.{j}          (resnet leaves renamed, below)
    input_blocks.{(n+1)i + j + 1}.1         down_blocks.{i}.attentions.{j}       (all levels but the last)
    input_blocks.{(n+1)(i+1)}.0.op          down_blocks.{i}.downsamplers.0.conv  (all levels but the last)
    middle_block.{0,1,2}                    mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    output_blocks.{(n+1)i + j}.0            up_blocks.{i}.resnets.{j}            (j < n + 1)
    output_blocks.{(n+1)i + j}.1            up_blocks.{i}.attentions.{j}         (all up levels but the first)
    output_blocks.{(n+1)i + n}.{1|2}.conv   up_blocks.{i}.upsamplers.0.conv      (index 1 in the first up level,
                                                                                  which has no attentions)
    out.{0,2}                               conv_norm_out, conv_out

Resnet leaves: in_layers.0 / in_layers.2 / emb_layers.1 / out_layers.0 / out_layers.3 / skip_connection <->
norm1 / conv1 / time_emb_proj / norm2 / conv2 / conv_shortcut. Inside the attentions the names are the same.

The transformers' proj_in / proj_out are stored as 1x1 convs [C, C, 1, 1] in SD 1.x files and as Linear [C, C] in
SD 2.x files (upstream writes them so); the model holds whichever its `use_linear_projection` says, and the
conversion reshapes between them. Conversions are strict: a key no row covers raises, naming it.
"""

from typing import Dict, List, Optional, Tuple

import numpy as np

_RESNET_LEAVES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

# (LDM block path, diffusers block path, leaf renames LDM -> diffusers; None: the rest of the key is kept)
Row = Tuple[str, str, Optional[Dict[str, str]]]


def unet_conversion_table(num_levels: int, layers_per_block: int) -> List[Row]:
    """Every block path of the UNet in both layouts, for a UNet of `num_levels` levels."""
    n = layers_per_block
    rows: List[Row] = [("time_embed.0", "time_embedding.linear_1", None),
                       ("time_embed.2", "time_embedding.linear_2", None),
                       ("input_blocks.0.0", "conv_in", None)]
    for i in range(num_levels):
        deepest = i == num_levels - 1
        for j in range(n):
            block = f"input_blocks.{(n + 1) * i + j + 1}"
            rows.append((f"{block}.0", f"down_blocks.{i}.resnets.{j}", _RESNET_LEAVES))
            if not deepest:
                rows.append((f"{block}.1", f"down_blocks.{i}.attentions.{j}", None))
        if not deepest:
            rows.append((f"input_blocks.{(n + 1) * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", None))
    rows += [("middle_block.0", "mid_block.resnets.0", _RESNET_LEAVES),
             ("middle_block.1", "mid_block.attentions.0", None),
             ("middle_block.2", "mid_block.resnets.1", _RESNET_LEAVES)]
    for i in range(num_levels):
        first = i == 0
        for j in range(n + 1):
            block = f"output_blocks.{(n + 1) * i + j}"
            rows.append((f"{block}.0", f"up_blocks.{i}.resnets.{j}", _RESNET_LEAVES))
            if not first:
                rows.append((f"{block}.1", f"up_blocks.{i}.attentions.{j}", None))
        if i != num_levels - 1:
            upsampler = f"output_blocks.{(n + 1) * i + n}.{1 if first else 2}.conv"
            rows.append((upsampler, f"up_blocks.{i}.upsamplers.0.conv", None))
    rows += [("out.0", "conv_norm_out", None), ("out.2", "conv_out", None)]
    return rows


def _lookup(table: List[Row], to_diffusers: bool) -> Dict[str, Tuple[str, Optional[Dict[str, str]]]]:
    """{source block path: (target block path, leaf renames source -> target)} for one direction."""
    lookup = {}
    for ldm, diffusers, leaves in table:
        if to_diffusers:
            lookup[ldm] = (diffusers, leaves)
        else:
            lookup[diffusers] = (ldm, None if leaves is None else {v: k for k, v in leaves.items()})
    return lookup


def _rename(key: str, lookup) -> Optional[str]:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest block path that the key starts with
        block = ".".join(parts[:cut])
        if block in lookup:
            target, leaves = lookup[block]
            rest = ".".join(parts[cut:])
            if leaves is None:
                return f"{target}.{rest}"
            leaf, _, param = rest.rpartition(".")
            return f"{target}.{leaves[leaf]}.{param}" if leaf in leaves and param in ("weight", "bias") else None
    return None


def _reshape_projection(key: str, value: np.ndarray, to_linear: bool) -> np.ndarray:
    """proj_in / proj_out weights: 1x1 conv [C, C, 1, 1] <-> Linear [C, C]; other shapes are left to the strict
    shape check."""
    if not key.endswith((".proj_in.weight", ".proj_out.weight")):
        return value
    if to_linear and value.ndim == 4 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0]
    if not to_linear and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _convert(state_dict, config: dict, to_diffusers: bool, file_linear: bool) -> Dict[str, np.ndarray]:
    lookup = _lookup(unet_conversion_table(len(config["block_out_channels"]), config["layers_per_block"]), to_diffusers)
    to_linear = config["use_linear_projection"] if to_diffusers else file_linear
    converted, unknown = {}, []
    for key, value in state_dict.items():
        new_key = _rename(key, lookup)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = _reshape_projection(new_key, value, to_linear)
    if unknown:
        layout = "LDM" if to_diffusers else "diffusers"
        raise ValueError(f"unknown {layout} UNet keys ({len(unknown)}): {', '.join(sorted(unknown))}")
    return converted


def convert_ldm_unet_checkpoint(v2: bool, ldm_state_dict: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    """LDM UNet state dict (the `model.diffusion_model.` prefix already stripped) -> the keys of
    `UNet2DConditionModel(**config)`; `v2`: the file stores Linear projections (SD 2.x)."""
    return _convert(ldm_state_dict, config, to_diffusers=True, file_linear=v2)


def convert_unet_state_dict_to_sd(v2: bool, unet_state_dict: Dict[str, np.ndarray],
                                  config: dict) -> Dict[str, np.ndarray]:
    """State dict of `UNet2DConditionModel(**config)` -> LDM UNet keys (without the `model.diffusion_model.`
    prefix), with the projections SD 2.x (`v2`) or SD 1.x files store."""
    return _convert(unet_state_dict, config, to_diffusers=False, file_linear=v2)
