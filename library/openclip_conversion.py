"""SDXL TE2 (OpenCLIP ViT-bigG text tower) <-> HF `CLIPTextModelWithProjection` state dicts (numpy arrays).

Keys are those of a single-file SDXL checkpoint after the `conditioner.embedders.1.model.` prefix.

text_projection: open_clip computes `x @ text_projection` with a [hidden, proj] matrix; an HF Linear computes
`x @ W.T` with W [proj, hidden]. So W = text_projection.T on load, and back on save. Kohya's single-file path
copies the matrix untransposed, which gives a pool2 different from SAI's, diffusers' and ComfyUI's; we follow
open_clip (see README, "text_projection").
"""

import re
from typing import Dict, Optional, Tuple

import numpy as np

# OpenCLIP name -> HF name, per resblock
_LAYER_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}  # split into q/k/v_proj.{weight,bias}
_TOP_RENAMES = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


def convert_sdxl_text_encoder_2_checkpoint(
    openclip_sd: Dict[str, np.ndarray],
) -> Tuple[Dict[str, np.ndarray], Optional[np.ndarray]]:
    """OpenCLIP TE2 state dict -> (HF `CLIPTextModelWithProjection` state dict, logit_scale or None)."""
    hf_sd, logit_scale, unknown = {}, None, []
    for key, value in openclip_sd.items():
        block = _RESBLOCK.match(key)
        if block:
            i, name = block.groups()
            prefix = f"text_model.encoder.layers.{i}."
            if name in _LAYER_RENAMES:
                hf_sd[prefix + _LAYER_RENAMES[name]] = value
            elif name in _IN_PROJ:
                q, k, v = np.split(value, 3, axis=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    hf_sd[f"{prefix}self_attn.{proj}.{_IN_PROJ[name]}"] = part
            else:
                unknown.append(key)
        elif key in _TOP_RENAMES:
            hf_sd[_TOP_RENAMES[key]] = value
        elif key == "text_projection":
            hf_sd["text_projection.weight"] = np.ascontiguousarray(value.T)
        elif key == "text_projection.weight":
            # Playground v2 stores it as a Linear weight [proj, hidden]: already in HF orientation
            hf_sd["text_projection.weight"] = value
        elif key == "logit_scale":
            logit_scale = value
        elif key.endswith("position_ids"):
            pass  # a buffer some savers (ComfyUI) include; positions are always 0..L-1
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the SDXL text encoder 2 (OpenCLIP) state dict: {sorted(unknown)}")
    return hf_sd, logit_scale


def convert_text_encoder_2_state_dict_to_sdxl(
    hf_sd: Dict[str, np.ndarray], logit_scale: Optional[np.ndarray] = None
) -> Dict[str, np.ndarray]:
    """HF `CLIPTextModelWithProjection` state dict (+ logit_scale if known) -> OpenCLIP TE2 state dict."""
    layer_names = {hf: oc for oc, hf in _LAYER_RENAMES.items()}
    top_names = {hf: oc for oc, hf in _TOP_RENAMES.items()}
    openclip_sd, unknown, qkv = {}, [], {}
    for key, value in hf_sd.items():
        layer = _HF_LAYER.match(key)
        if layer:
            i, name = layer.groups()
            if name in layer_names:
                openclip_sd[f"transformer.resblocks.{i}.{layer_names[name]}"] = value
            elif re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", name):
                qkv[(i, name)] = value
            else:
                unknown.append(key)
        elif key in top_names:
            openclip_sd[top_names[key]] = value
        elif key == "text_projection.weight":
            openclip_sd["text_projection"] = np.ascontiguousarray(value.T)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the HF text encoder 2 state dict: {sorted(unknown)}")

    for i, suffix in sorted({(i, name.rsplit(".", 1)[1]) for i, name in qkv}):
        parts = [(i, f"self_attn.{p}_proj.{suffix}") for p in "qkv"]
        missing = [f"text_model.encoder.layers.{i}.{name}" for i, name in parts if (i, name) not in qkv]
        if missing:
            raise ValueError(f"cannot merge q/k/v into in_proj: missing {missing}")
        merged = np.concatenate([qkv[p] for p in parts], axis=0)
        openclip_sd[f"transformer.resblocks.{i}.attn.in_proj_{suffix}"] = merged
    if logit_scale is not None:
        openclip_sd["logit_scale"] = logit_scale
    return openclip_sd
