"""The LoRA file format: `.safetensors` reading/writing, the `sshs_*` hashes, and key-name conversions.

A Kohya LoRA file holds, per LoRA module, `<lora_name>.lora_down.weight`, `<lora_name>.lora_up.weight` and a
0-d `<lora_name>.alpha`, in torch's layouts (Linear [out, in], Conv2d [out, in, kh, kw]), with string metadata.
Everything here works on numpy arrays (safetensors' numpy API; `ml_dtypes` supplies bfloat16), so the files are
byte-compatible with the ones `safetensors.torch` writes.
"""

import hashlib
import os
import re
from typing import Dict, Iterable, Tuple

import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" so safetensors' numpy API can read and write BF16
import numpy as np
import safetensors
import safetensors.numpy

from library.sdxl_model_util import write_safetensors

LORA_DOWN = "lora_down.weight"
LORA_UP = "lora_up.weight"
ALPHA = "alpha"

# sd-webui-additional-networks' legacy hash reads 64 KiB at 1 MiB into the file
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


def read_lora_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, metadata) of a LoRA `.safetensors` file; a clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are supported (torch .ckpt/.pt files need torch; "
                         "convert them with safetensors first)")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    return tensors, metadata


def read_metadata(path: str) -> Dict[str, str]:
    """The string metadata of any `.safetensors` file (LoRA or checkpoint), without reading its tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e


def addnet_hash_safetensors(data: bytes) -> str:
    """sha256 of everything after the header: depends on the tensors only, not on the metadata."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """First 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (sd-webui-additional-networks' old hash)."""
    return hashlib.sha256(data[_LEGACY_HASH_OFFSET:_LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()[:8]


def precalculate_safetensors_hashes(tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as Kohya computes them: on the file serialised with only the `ss_*`
    metadata, so the values do not depend on the hashes themselves or on modelspec entries."""
    ss_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.numpy.save(tensors, metadata=ss_metadata)
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


def write_lora_file(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]):
    """Write tensors + metadata (plus the two `sshs_*` hashes) to `path`, atomically (temp name, then rename)."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise ValueError(f"{path}: LoRA weights are saved as .safetensors only")
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata '{key}' must be a str (safetensors stores strings), got {type(value).__name__}")
    tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    for key, value in tensors.items():
        if not np.isfinite(value.astype(np.float32)).all():
            raise ValueError(f"{path}: not written: {key} has non-finite values (NaN or inf)")
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_safetensors(path, tensors, metadata)


def split_lora_key(key: str) -> Tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    name, _, suffix = key.partition(".")
    return name, suffix


def modules_dims_and_alphas(tensors: Dict[str, np.ndarray]) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Per LoRA module: dim = rows of lora_down, alpha = the `.alpha` value, or dim when absent (old files)."""
    dims, alphas = {}, {}
    for key, value in tensors.items():
        name, suffix = split_lora_key(key)
        if suffix == LORA_DOWN:
            dims[name] = int(value.shape[0])
        elif suffix == ALPHA:
            alphas[name] = float(np.asarray(value, dtype=np.float32))
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))
    return dims, {name: alphas[name] for name in dims}


# --- diffusers-named UNet keys (`lora_unet_down_blocks_0_...`) -> SGM names (`lora_unet_input_blocks_1_...`) ---
# The SGM layout has num_res_blocks = 2 per level (SDXL and our tiny config): down level i, resnet/attention j is
# input block 3i+j+1; up level i, slot j is output block 3i+j; see reference 5.2 (make_unet_conversion_map).

_RESNET_INNER = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}
_DIFFUSERS_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$")
_DIFFUSERS_TOP = {"time_embedding_linear_1": "time_embed_0", "time_embedding_linear_2": "time_embed_2",
                  "add_embedding_linear_1": "label_emb_0_0", "add_embedding_linear_2": "label_emb_0_2",
                  "conv_in": "input_blocks_0_0", "conv_out": "out_2"}
UNET_PREFIX = "lora_unet_"


def diffusers_to_sgm_module_name(module: str):
    """SGM name of a diffusers UNet module path (`_`-joined, without `lora_unet_`), or None if it is not one."""
    if module in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[module]
    m = _DIFFUSERS_BLOCK.match(module)
    if m:
        side, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            inner = _RESNET_INNER.get(rest)
            block = 3 * level + index + 1 if side == "down_blocks" else 3 * level + index
            slot = "0"
        elif kind == "attentions":
            inner = rest
            block = 3 * level + index + 1 if side == "down_blocks" else 3 * level + index
            slot = "1"
        elif kind == "downsamplers" and side == "down_blocks" and rest == "conv":
            return f"input_blocks_{3 * (level + 1)}_0_op"
        elif kind == "upsamplers" and side == "up_blocks" and rest == "conv":
            return f"output_blocks_{3 * level + 2}_2_conv"
        else:
            return None
        if inner is None:
            return None
        stage = "input_blocks" if side == "down_blocks" else "output_blocks"
        return f"{stage}_{block}_{slot}_{inner}"
    m = _DIFFUSERS_MID.match(module)
    if m:
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block_1_{rest}" if index == 0 else None
        inner = _RESNET_INNER.get(rest)
        return f"middle_block_{2 * index}_{inner}" if inner is not None else None
    return None


def is_diffusers_unet_name(lora_name: str) -> bool:
    module = lora_name[len(UNET_PREFIX):] if lora_name.startswith(UNET_PREFIX) else None
    return module is not None and module.startswith(("down_blocks_", "up_blocks_", "mid_block_"))


def convert_diffusers_to_sgm(tensors: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], list]:
    """Rename diffusers-named UNet LoRA keys to SGM names; returns (new dict, module names that did not convert).

    Keys that are not diffusers UNet names (text encoders, SGM names) pass through unchanged; a diffusers name with
    no SGM counterpart also passes through and is reported, so the caller can list it as unmatched.
    """
    converted, failed = {}, []
    for key, value in tensors.items():
        name, suffix = split_lora_key(key)
        if is_diffusers_unet_name(name):
            sgm = diffusers_to_sgm_module_name(name[len(UNET_PREFIX):])
            if sgm is None:
                failed.append(name)
            else:
                name = UNET_PREFIX + sgm
        new_key = f"{name}.{suffix}" if suffix else name
        if new_key in converted:
            raise ValueError(f"LoRA key '{key}' converts to '{new_key}', which the file already holds")
        converted[new_key] = value
    return converted, sorted(set(failed))


# SD 1.x/2.x UNet module names (diffusers layout) that SDXL's UNet, with 3 levels and no attention in the first,
# cannot have; other diffusers names may be an SDXL LoRA and are converted (convert_diffusers_to_sgm)
_SD1_UNET_PREFIXES = ("lora_unet_down_blocks_0_attentions_", "lora_unet_down_blocks_3_", "lora_unet_up_blocks_3_")


def foreign_lora_kind(names: Iterable[str]):
    """What kind of file a set of module/key names comes from when it cannot be an SDXL LoRA in Kohya's format,
    else None."""
    names = list(names)
    if any(".hada_w1" in n for n in names):
        return "a LyCORIS LoHa file (not plain LoRA)"
    if any(".lokr_w1" in n for n in names):
        return "a LyCORIS LoKr file (not plain LoRA)"
    if any(".lora_A." in n or ".lora_B." in n for n in names):
        return "a PEFT/diffusers-format LoRA (lora_A/lora_B keys), not Kohya's format"
    if any(n.startswith(("lora_transformer_", "lora_unet_double_blocks", "lora_unet_single_blocks")) for n in names):
        return "a LoRA for a DiT model (SD3/Flux), not SDXL"
    if any(n.startswith("lora_te_") for n in names):
        return "an SD 1.x/2.x LoRA (one text encoder: lora_te_ keys), not SDXL (lora_te1_/lora_te2_)"
    if any(n.startswith(_SD1_UNET_PREFIXES) for n in names):
        return "an SD 1.x/2.x LoRA (UNet blocks SDXL does not have, e.g. down_blocks_0 attentions), not SDXL"
    if not any(n.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for n in names):
        return "not a Kohya LoRA file (no lora_unet_/lora_te*_ keys)"
    return None


def describe_lora_names(names: Iterable[str]) -> str:
    """A guess at what kind of file a set of module/key names comes from, for error messages."""
    return foreign_lora_kind(names) or "a Kohya SDXL-style LoRA whose module names or shapes do not fit this model"


def check_sdxl_lora_file(path: str):
    """One-line ValueError naming `path` when the file is not an SDXL LoRA in Kohya's format, when a module's
    lora_up does not take its lora_down's rank, or when a tensor holds NaN or inf (a diverged run: merging it
    would turn every image black). Checks the header first, then reads one tensor at a time; cheap to run on
    every file before any weight is loaded or changed."""
    try:
        with safetensors.safe_open(path, framework="np") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e
    kind = foreign_lora_kind(shapes)
    if kind:
        raise ValueError(f"{path}: it looks like {kind}; only SDXL LoRAs (lora_unet_/lora_te1_/lora_te2_ keys) merge here")
    for key, down in shapes.items():
        name, suffix = split_lora_key(key)
        if suffix != LORA_DOWN:
            continue
        up = shapes.get(f"{name}.{LORA_UP}")
        if up is None:
            raise ValueError(f"{path}: module {name}: has {LORA_DOWN} but no {LORA_UP}")
        rank = down[0] if down else None
        if len(up) != len(down) or len(up) < 2 or up[1] != rank:
            expected = up[:1] + (rank,) + (1,) * (len(down) - 2)
            raise ValueError(f"{path}: module {name}: {LORA_DOWN} {down} has rank {rank}, so {LORA_UP} should have "
                             f"shape {expected}; found {up}")
        alpha = shapes.get(f"{name}.{ALPHA}")
        if alpha is not None and int(np.prod(alpha)) != 1:
            raise ValueError(f"{path}: module {name}: {ALPHA} should be a single number; found shape {alpha}")
    with safetensors.safe_open(path, framework="np") as f:
        for key in f.keys():
            if not np.isfinite(f.get_tensor(key).astype(np.float32)).all():
                raise ValueError(f"{path}: module {split_lora_key(key)[0]}: {key} has non-finite values (NaN or inf); "
                                 "the file comes from a diverged training run and cannot be used")
