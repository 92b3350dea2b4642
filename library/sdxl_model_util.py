"""SDXL single-file checkpoints <-> MindSpore models.

A single-file SDXL checkpoint (SGM layout) holds four models under four prefixes:

    model.diffusion_model.*                 UNet, SGM names (== our UNet's parameter names)
    conditioner.embedders.0.transformer.*   CLIP-L text encoder, HF names (== ours)
    conditioner.embedders.1.model.*         OpenCLIP bigG text encoder (converted to HF names and back)
    first_stage_model.*                     VAE, LDM names (converted to diffusers names and back)

Loading is strict per model: a key under a model's prefix that the model does not have, a parameter
the checkpoint lacks, or a shape mismatch is an error that names the keys. Keys under no known prefix
belong to no model we build (upstream ignores them too); they are listed in a log line.

The model architecture comes from (in order): the `config` argument, the `sdxl_ms.model_config` metadata
entry that `tools/make_tiny_checkpoint.py` writes, or SDXL base 1.0 (configs/sdxl_base.json).
"""

import json
import logging
import os
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore.nn.utils import no_init_parameters
from safetensors import safe_open
from safetensors.numpy import save_file

from library.autoencoder_kl import AutoencoderKL
from library.clip_text_model import CLIPTextModel, CLIPTextModelWithProjection
from library.model_util import convert_ldm_vae_checkpoint, convert_vae_state_dict
from library.openclip_conversion import convert_sdxl_text_encoder_2_checkpoint, convert_text_encoder_2_state_dict_to_sdxl
from library.sdxl_original_unet import SdxlUNet2DConditionModel

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
MODEL_PREFIXES = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)

# buffers that checkpoints may carry but that are not parameters of our models
TE1_IGNORED_KEYS = ("text_model.embeddings.position_ids",)

CONFIG_METADATA_KEY = "sdxl_ms.model_config"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
VAE_SCALE_FACTOR = 0.13025


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def load_model_config(name_or_path: str = "sdxl_base") -> dict:
    """A model config from configs/<name>.json or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
        raise FileNotFoundError(f"model config '{name_or_path}' not found (known: {', '.join(known)})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_models(config: dict, allocate: bool = True):
    """(text_encoder1, text_encoder2, vae, unet) from a config dict; `allocate=False` builds without weights."""

    def build():
        return (
            CLIPTextModel(**config["text_encoder_1"]),
            CLIPTextModelWithProjection(**config["text_encoder_2"]),
            AutoencoderKL(**config["vae"]),
            SdxlUNet2DConditionModel(**config["unet"]),
        )

    if allocate:
        models = build()
    else:
        with no_init_parameters():
            models = build()
    # unique parameter names across the four models (both text encoders have `text_model.encoder...`): an
    # optimizer's ParameterTuple over LoRA weights of both encoders requires them. State-dict keys come from
    # `parameters_and_names()` paths and are unaffected.
    for tag, model in zip(("text_encoder1.", "text_encoder2.", "vae.", "unet."), models):
        for name, param in model.parameters_and_names():
            param.name = tag + name
    return models


def state_dict_of(cell) -> dict:
    """{parameter name: numpy array} of a cell."""
    return {name: param.asnumpy() for name, param in cell.parameters_and_names()}


def read_safetensors(path: str):
    """(tensors, metadata) of a .safetensors file, with a clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    return tensors, metadata


def load_state_dict_into(cell, state_dict: dict, what: str, dtype=None):
    """Copy numpy arrays into the cell's parameters, strictly: every key and every shape must match."""
    params = dict(cell.parameters_and_names())
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        lines = [f"{what}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise CheckpointError("\n".join(lines))
    for name, param in params.items():
        value = state_dict[name]
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{what}: shape mismatch for '{name}': checkpoint {tuple(value.shape)}, model {tuple(param.shape)}"
            )
    for name, param in params.items():
        target_dtype = dtype or param.dtype
        param.set_data(ms.Tensor(np.asarray(state_dict[name], dtype=np.float32), target_dtype))


def split_checkpoint(tensors: dict):
    """Split a single-file state dict by model prefix: (unet, te1, te2_openclip, vae_ldm, other_keys)."""
    parts = {prefix: {} for prefix in MODEL_PREFIXES}
    other = []
    for key, value in tensors.items():
        prefix = next((p for p in MODEL_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
        else:
            parts[prefix][key[len(prefix):]] = value
    for key in TE1_IGNORED_KEYS:
        parts[TE1_PREFIX].pop(key, None)
    return parts[UNET_PREFIX], parts[TE1_PREFIX], parts[TE2_PREFIX], parts[VAE_PREFIX], sorted(other)


def load_models_from_sdxl_checkpoint(path: str, dtype=None, config: dict = None):
    """Load a single-file SDXL `.safetensors` checkpoint.

    Returns (text_encoder1, text_encoder2, vae, unet, logit_scale, ckpt_info) as upstream; `ckpt_info` is
    None (safetensors files carry no epoch/step). `dtype` (a mindspore dtype) casts every weight.
    """
    tensors, metadata = read_safetensors(path)
    if config is None:
        config = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else load_model_config()
    unet_sd, te1_sd, te2_openclip_sd, vae_ldm_sd, other = split_checkpoint(tensors)
    if other:
        logger.info("%s: ignoring %d keys that belong to no SDXL model: %s", path, len(other), ", ".join(other[:10]))
    if not unet_sd:
        raise CheckpointError(f"{path}: no '{UNET_PREFIX}*' keys; is this a single-file SDXL checkpoint?")

    te1, te2, vae, unet = build_models(config, allocate=False)
    try:
        te2_sd, logit_scale = convert_sdxl_text_encoder_2_checkpoint(te2_openclip_sd)
        vae_sd = convert_ldm_vae_checkpoint(vae_ldm_sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    load_state_dict_into(unet, unet_sd, f"{path} (UNet, '{UNET_PREFIX}*')", dtype)
    load_state_dict_into(te1, te1_sd, f"{path} (text encoder 1, '{TE1_PREFIX}*')", dtype)
    load_state_dict_into(te2, te2_sd, f"{path} (text encoder 2, '{TE2_PREFIX}*')", dtype)
    load_state_dict_into(vae, vae_sd, f"{path} (VAE, '{VAE_PREFIX}*')", dtype)
    return te1, te2, vae, unet, logit_scale, None


def sdxl_state_dict(text_encoder1, text_encoder2, unet, vae, logit_scale=None) -> dict:
    """The single-file checkpoint state dict (numpy) of the four models."""
    state_dict = {}
    for prefix, part in (
        (UNET_PREFIX, state_dict_of(unet)),
        (TE1_PREFIX, state_dict_of(text_encoder1)),
        (TE2_PREFIX, convert_text_encoder_2_state_dict_to_sdxl(state_dict_of(text_encoder2), logit_scale)),
        (VAE_PREFIX, convert_vae_state_dict(state_dict_of(vae))),
    ):
        state_dict.update({prefix + key: value for key, value in part.items()})
    return state_dict


def save_stable_diffusion_checkpoint(output_file, text_encoder1, text_encoder2, unet, vae, logit_scale=None,
                                     metadata=None, save_dtype=None):
    """Write the four models as one SGM-layout `.safetensors` file (temp name, then rename).

    `save_dtype` is a numpy dtype (e.g. np.float16 or ml_dtypes.bfloat16); None keeps the weights' dtype.
    """
    state_dict = sdxl_state_dict(text_encoder1, text_encoder2, unet, vae, logit_scale)
    if save_dtype is not None:
        state_dict = {key: value.astype(save_dtype) for key, value in state_dict.items()}
    write_safetensors(output_file, state_dict, metadata)


def write_safetensors(path, tensors: dict, metadata: dict = None):
    """Write atomically: a run killed mid-write leaves any previous file at `path` intact."""
    path = str(path)
    tmp_path = path + ".tmp"
    # np.asarray keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d)
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, tmp_path, metadata=metadata)
    os.replace(tmp_path, path)
