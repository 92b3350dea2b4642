"""The VAE's state-dict conversion between the LDM (single-file checkpoint) and diffusers layouts.

LDM (`first_stage_model.*` in a single-file checkpoint, prefix stripped here) and diffusers name the same
tensors differently:

    LDM                                   diffusers
    encoder.down.{i}.block.{j}.*          encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.downsample.conv      encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{i}.block.{j}.*            decoder.up_blocks.{n-1-i}.resnets.{j}.*     (levels reversed)
    decoder.up.{i}.upsample.conv          decoder.up_blocks.{n-1-i}.upsamplers.0.conv
    {en,de}coder.mid.block_{1,2}          {en,de}coder.mid_block.resnets.{0,1}
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}
                                          {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    {en,de}coder.norm_out                 {en,de}coder.conv_norm_out
    *.nin_shortcut                        *.conv_shortcut

LDM's attention projections are 1x1 convs ([C, C, 1, 1]); diffusers' are Linear ([C, C]).
Conversions are strict: a key that no rule covers raises, naming it, rather than being dropped.
"""

import re
from typing import Dict, List, Tuple

import numpy as np

_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# (LDM block path, diffusers block path, leaf renames LDM -> diffusers). `{p}` is encoder/decoder, `{i}`/`{j}`
# are indices, and `{r}` is the decoder level counted the other way (diffusers up_blocks[r] = LDM up[n-1-r]).
_VAE_RULES: List[Tuple[str, str, Dict[str, str]]] = [
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", _RESNET_LEAVES),
    ("encoder.down.{i}.downsample", "encoder.down_blocks.{i}.downsamplers.0", {"conv": "conv"}),
    ("decoder.up.{i}.block.{j}", "decoder.up_blocks.{r}.resnets.{j}", _RESNET_LEAVES),
    ("decoder.up.{i}.upsample", "decoder.up_blocks.{r}.upsamplers.0", {"conv": "conv"}),
    ("{p}.mid.block_1", "{p}.mid_block.resnets.0", _RESNET_LEAVES),
    ("{p}.mid.block_2", "{p}.mid_block.resnets.1", _RESNET_LEAVES),
    ("{p}.mid.attn_1", "{p}.mid_block.attentions.0", _ATTENTION_LEAVES),
    ("{p}", "{p}", {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}),
    ("", "", {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}),
]

_FIELD_PATTERNS = {"p": r"(?P<p>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "r": r"(?P<r>\d+)"}


def _rule_regex(block_path: str, leaves) -> "re.Pattern":
    pattern = re.escape(block_path)
    for field, group in _FIELD_PATTERNS.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), group)
    leaf = "|".join(re.escape(name) for name in leaves)
    prefix = pattern + r"\." if block_path else ""
    return re.compile(prefix + rf"(?P<leaf>{leaf})\.(?P<param>weight|bias)")


def _compile_rules(to_diffusers: bool):
    compiled = []
    for ldm_path, diffusers_path, leaves in _VAE_RULES:
        is_attention = leaves is _ATTENTION_LEAVES
        if to_diffusers:
            compiled.append((_rule_regex(ldm_path, leaves), diffusers_path, leaves, is_attention))
        else:
            inverse = {v: k for k, v in leaves.items()}
            compiled.append((_rule_regex(diffusers_path, inverse), ldm_path, inverse, is_attention))
    return compiled


_LDM_TO_DIFFUSERS = _compile_rules(to_diffusers=True)
_DIFFUSERS_TO_LDM = _compile_rules(to_diffusers=False)


def _num_decoder_levels(keys, level_pattern: str) -> int:
    levels = {int(m.group(1)) for m in map(re.compile(level_pattern).match, keys) if m}
    return max(levels) + 1 if levels else 0


def _convert_vae(state_dict: Dict[str, np.ndarray], rules, num_levels: int, to_diffusers: bool):
    converted, unknown = {}, []
    for key, value in state_dict.items():
        for regex, target_path, leaves, is_attention in rules:
            match = regex.fullmatch(key)
            if match:
                break
        else:
            unknown.append(key)
            continue
        fields = {k: v for k, v in match.groupdict().items() if v is not None and k in _FIELD_PATTERNS}
        # the level index is mirrored the same way in both directions
        if "i" in fields:
            fields["r"] = str(num_levels - 1 - int(fields["i"]))
        elif "r" in fields:
            fields["i"] = str(num_levels - 1 - int(fields["r"]))
        leaf = leaves[match.group("leaf")]
        new_key = ".".join(part for part in (target_path.format(**fields), leaf, match.group("param")) if part)
        if is_attention:
            value = _reshape_attention_weight(value, to_diffusers)
        converted[new_key] = value
    if unknown:
        layout = "LDM" if to_diffusers else "diffusers"
        raise ValueError(f"unknown {layout} VAE keys ({len(unknown)}): {', '.join(sorted(unknown))}")
    return converted


def _reshape_attention_weight(value: np.ndarray, to_diffusers: bool) -> np.ndarray:
    """1x1 conv [C, C, 1, 1] (LDM) <-> Linear [C, C] (diffusers); biases pass through."""
    if to_diffusers and value.ndim == 4:
        return value[:, :, 0, 0]
    if not to_diffusers and value.ndim == 2:
        return value[:, :, None, None]
    return value


def convert_ldm_vae_checkpoint(ldm_state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """LDM VAE state dict (the `first_stage_model.` prefix already stripped) -> diffusers AutoencoderKL keys."""
    num_levels = _num_decoder_levels(ldm_state_dict, r"decoder\.up\.(\d+)\.")
    return _convert_vae(ldm_state_dict, _LDM_TO_DIFFUSERS, num_levels, to_diffusers=True)


def convert_vae_state_dict(diffusers_state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """diffusers AutoencoderKL state dict -> LDM VAE keys (without the `first_stage_model.` prefix)."""
    num_levels = _num_decoder_levels(diffusers_state_dict, r"decoder\.up_blocks\.(\d+)\.")
    return _convert_vae(diffusers_state_dict, _DIFFUSERS_TO_LDM, num_levels, to_diffusers=False)
