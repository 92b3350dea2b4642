"""SD 1.x / 2.x single-file checkpoints <-> MindSpore models, with upstream's function names.

A single-file (LDM layout) checkpoint holds three models under three prefixes:

    model.diffusion_model.*          UNet, LDM names (diffusers names in the model: original_unet_conversion.py)
    cond_stage_model.transformer.*   SD 1.x text encoder: CLIP-L, HF names (== ours); older files lack the
                                     `text_model.` level (`cond_stage_model.transformer.encoder...`), as upstream
                                     accepts
    cond_stage_model.model.*         SD 2.x text encoder: OpenCLIP ViT-H text tower (openclip_conversion.py)
    first_stage_model.*              VAE, LDM names (vae_conversion.py)

SD 2.x: like upstream, the text encoder is built without OpenCLIP's last resblock (SD 2.x conditions on the
penultimate layer, so the last layer of the model here is that one) and without `text_projection` /
`logit_scale`; loading skips those keys. Saving takes them back from `ckpt_path`, or, without one, writes
upstream's stand-ins (the last resblock a copy of the one before, a ones projection, logit_scale 1).

Loading is strict and streams, as `sdxl_model_util.load_models_from_sdxl_checkpoint`: every key and shape is checked
from the header first, against the model's state dict converted to the file's layout, so errors name the file's keys;
then tensors are read one at a time (the VAE as one group), converted, cast and placed into models built without
data. Keys under no model's prefix (EMA weights, schedule buffers) are ignored, with a log line.

The architecture comes from the `config` argument, the checkpoint's `sdxl_ms.model_config` metadata
(tools/make_tiny_checkpoint.py writes it), or configs/sd_v2.json / configs/sd_v1.json.
"""

import json
import logging
import os
from typing import Callable, NamedTuple

import numpy as np
from mindspore.nn.utils import no_init_parameters

from library.autoencoder_kl import AutoencoderKL
from library.clip_text_model import CLIPTextModel
from library.openclip_conversion import (convert_sdxl_text_encoder_2_checkpoint,
                                         convert_text_encoder_2_state_dict_to_sdxl)
from library.original_unet import UNet2DConditionModel
from library.original_unet_conversion import convert_ldm_unet_checkpoint, convert_unet_state_dict_to_sd
from library.sdxl_model_util import (CONFIG_METADATA_KEY, UNET_PREFIX, VAE_PREFIX, CheckpointError, CheckpointReader,
                                     assign_parameter, check_shapes, load_model_config, state_dict_of,
                                     write_safetensors)
from library.vae_conversion import convert_ldm_vae_checkpoint, convert_vae_state_dict

logger = logging.getLogger(__name__)

TE_V1_PREFIX = "cond_stage_model.transformer."
TE_V2_PREFIX = "cond_stage_model.model."
SDXL_TE_PREFIX = "conditioner.embedders."  # only to recognise an SDXL file (error messages, the tools' --sdxl)

# the older CLIP-L layout of SD 1.x files (transformers < 4.x), renamed to today's on load as upstream does
_TE_V1_OLD_LAYOUT = ("embeddings.", "encoder.", "final_layer_norm.")
_TE_V1_IGNORED = ("text_model.embeddings.position_ids",)  # a buffer some savers include


def build_sd_models(config: dict, allocate: bool = True):
    """(text_encoder, vae, unet) from an SD config dict (configs/sd_v1.json, ...); `allocate=False` builds without
    weights."""

    def build():
        return (CLIPTextModel(**config["text_encoder"]), AutoencoderKL(**config["vae"]),
                UNet2DConditionModel.from_config(config["unet"]))

    if allocate:
        models = build()
    else:
        with no_init_parameters():
            models = build()
    # unique parameter names across the models, as sdxl_model_util.build_models (state-dict keys are unaffected)
    for tag, model in zip(("text_encoder.", "vae.", "unet."), models):
        for name, param in model.parameters_and_names():
            param.name = tag + name
    return models


def _te_v1_name(name: str) -> str:
    return "text_model." + name if name.startswith(_TE_V1_OLD_LAYOUT) else name


def _te_v2_skipped(num_hidden_layers: int):
    """OpenCLIP keys (after the prefix) that the truncated SD 2.x text encoder has no parameter for."""
    last_block = f"transformer.resblocks.{num_hidden_layers}."

    def skipped(name):
        return (name.startswith(last_block) or name in ("text_projection", "logit_scale")
                or name.endswith("position_ids"))

    return skipped


def convert_text_encoder_state_dict_to_sd_v2(hf_state_dict: dict, make_dummy_weights: bool = False) -> dict:
    """HF-layout SD 2.x text encoder state dict -> OpenCLIP keys (without `cond_stage_model.model.`).

    `make_dummy_weights` adds what the truncated model lacks, as upstream does when there is no source checkpoint:
    the last resblock as a copy of the one before, `text_projection` of ones and `logit_scale` 1.
    """
    openclip = convert_text_encoder_2_state_dict_to_sdxl(hf_state_dict)
    if make_dummy_weights:
        last = max(int(key.split(".")[2]) for key in openclip if key.startswith("transformer.resblocks."))
        source, copy = f"transformer.resblocks.{last}.", f"transformer.resblocks.{last + 1}."
        for key in [k for k in openclip if k.startswith(source)]:
            openclip[copy + key[len(source):]] = np.array(openclip[key])
        width, dtype = openclip["ln_final.weight"].shape[0], openclip["ln_final.weight"].dtype
        openclip["text_projection"] = np.ones((width, width), dtype)
        openclip["logit_scale"] = np.array(1.0, dtype)
    return openclip


def _keep_name(name: str) -> str:
    return name


def _skip_none(name: str) -> bool:
    return False


class _Section(NamedTuple):
    """One model's part of the checkpoint."""

    what: str
    model: object
    prefix: str
    to_model: Callable  # {name in the file's layout: array} -> {model parameter name: array}
    to_file: Callable  # the inverse
    normalise: Callable = _keep_name  # file key after the prefix -> its name in today's file layout
    skipped: Callable = _skip_none  # names the model has no parameter for
    whole: bool = False  # the conversion needs all the section's tensors at once


def _sections(v2: bool, text_encoder, vae, unet, make_dummy_weights: bool = False):
    config = unet.config
    if v2:
        te = _Section("text encoder", text_encoder, TE_V2_PREFIX,
                      lambda sd: convert_sdxl_text_encoder_2_checkpoint(sd)[0],
                      lambda sd: convert_text_encoder_state_dict_to_sd_v2(sd, make_dummy_weights),
                      skipped=_te_v2_skipped(len(text_encoder.text_model.encoder.layers)))
    else:
        te = _Section("text encoder", text_encoder, TE_V1_PREFIX, dict, dict, normalise=_te_v1_name,
                      skipped=lambda name: name in _TE_V1_IGNORED)
    return [
        _Section("UNet", unet, UNET_PREFIX, lambda sd: convert_ldm_unet_checkpoint(v2, sd, config),
                 lambda sd: convert_unet_state_dict_to_sd(v2, sd, config)),
        te,
        _Section("VAE", vae, VAE_PREFIX, convert_ldm_vae_checkpoint, convert_vae_state_dict, whole=True),
    ]


def _missing_section_error(path: str, v2: bool, prefix: str, keys) -> CheckpointError:
    hint = "is this a single-file SD 1.x / 2.x checkpoint?"
    if any(k.startswith(SDXL_TE_PREFIX) for k in keys):
        hint = "it is an SDXL checkpoint (use the sdxl_* scripts)"
    elif v2 and any(k.startswith(TE_V1_PREFIX) for k in keys):
        hint = f"it has an SD 1.x text encoder ('{TE_V1_PREFIX}*'): drop --v2"
    elif not v2 and any(k.startswith(TE_V2_PREFIX) for k in keys):
        hint = f"it has an SD 2.x text encoder ('{TE_V2_PREFIX}*'): add --v2"
    return CheckpointError(f"{path}: no '{prefix}*' keys; {hint}")


def _shape_stub(shape) -> np.ndarray:
    """A zero-stride array of `shape`: the conversions rename, split and reshape it without any data."""
    return np.broadcast_to(np.zeros((), np.float16), shape)


def load_models_from_stable_diffusion_checkpoint(v2: bool, ckpt_path: str, dtype=None, config: dict = None):
    """(text_encoder, vae, unet) from a single-file SD 1.x (`v2` False) or 2.x `.safetensors` checkpoint.

    `dtype` (a mindspore dtype) casts every weight; None keeps fp32. `config`: the architecture (see above).
    """
    reader = CheckpointReader(ckpt_path)
    if config is None:
        metadata = reader.metadata
        config = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata \
            else load_model_config("sd_v2" if v2 else "sd_v1")
    if "v2" in config and config["v2"] != v2:
        family = "2.x" if config["v2"] else "1.x"
        raise CheckpointError(f"{ckpt_path}: the model config '{config.get('name')}' is SD {family}, but "
                              f"{'--v2 was' if v2 else 'no --v2 was'} given")
    models = build_sd_models(config, allocate=False)
    sections = _sections(v2, *models)

    # per section {name in the file's layout: file key}, checked against the models before any tensor is read
    section_keys = [{} for _ in sections]
    claimed = set()
    for section, keys in zip(sections, section_keys):
        for key in reader.keys:
            if key.startswith(section.prefix):
                claimed.add(key)
                name = section.normalise(key[len(section.prefix):])
                if not section.skipped(name):
                    keys[name] = key
    for section, keys in zip(sections, section_keys):
        if not keys:
            raise _missing_section_error(ckpt_path, v2, section.prefix, reader.keys)
    for section, keys in zip(sections, section_keys):
        stubs = {name: _shape_stub(param.shape) for name, param in section.model.parameters_and_names()}
        expected = {section.prefix + name: value.shape for name, value in section.to_file(stubs).items()}
        found = {section.prefix + name: reader.shape(key) for name, key in keys.items()}
        check_shapes(expected, found, f"{ckpt_path} ({section.what}, '{section.prefix}*')")
    other = sorted(set(reader.keys) - claimed)
    if other:
        logger.info("%s: ignoring %d keys that belong to no SD model: %s", ckpt_path, len(other), ", ".join(other[:10]))

    for section, keys in zip(sections, section_keys):
        params = dict(section.model.parameters_and_names())
        groups = [keys] if section.whole else [{name: key} for name, key in keys.items()]
        for group in groups:
            for name, value in section.to_model({name: reader.get(key) for name, key in group.items()}).items():
                assign_parameter(params[name], value, dtype)
    return models


def is_sdxl_checkpoint(path: str) -> bool:
    """Whether a single-file checkpoint holds SDXL's text encoders (read from its header)."""
    return any(key.startswith(SDXL_TE_PREFIX) for key in CheckpointReader(path).keys)


def get_model_version_str_for_sd1_sd2(v2: bool, v_parameterization: bool) -> str:
    """ss_base_model_version as upstream writes it: sd_v1, sd_v2, and with v-parameterization sd_v1_v / sd_v2_v."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def load_sd_models(path: str, v2: bool, flag: str, dtype=None):
    """(text_encoder, vae, unet) from a single-file SD 1.x / 2.x checkpoint or a diffusers model folder; `flag`
    names the option in errors."""
    from library import diffusers_loading  # it builds its models with this module

    if os.path.isdir(path):
        if not diffusers_loading.is_diffusers_folder(path):
            raise ValueError(f"{flag} {path}: a folder without {diffusers_loading.MODEL_INDEX}, so not a diffusers "
                             "model folder")
        return diffusers_loading.load_sd_models_from_diffusers_folder(path, v2, dtype)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path} (hub ids need network access)")
    return load_models_from_stable_diffusion_checkpoint(v2, path, dtype)


def sd_state_dict(v2: bool, text_encoder, unet, vae=None, dtype=None, make_dummy_weights: bool = False) -> dict:
    """The single-file checkpoint state dict (numpy) of the models, with prefixes; `dtype` (numpy) casts tensor by
    tensor. Without `vae`, no `first_stage_model.*` keys; `make_dummy_weights`: see
    convert_text_encoder_state_dict_to_sd_v2."""
    state_dict = {}
    for section in _sections(v2, text_encoder, vae, unet, make_dummy_weights):
        if section.model is not None:
            converted = section.to_file(state_dict_of(section.model, dtype))
            state_dict.update({section.prefix + name: value for name, value in converted.items()})
    return state_dict


def save_stable_diffusion_checkpoint(v2: bool, output_file, text_encoder, unet, ckpt_path, epochs, steps,
                                     metadata=None, save_dtype=None, vae=None) -> int:
    """Write the models as one LDM-layout `.safetensors` file (temporary name, then rename); returns the key count.

    As upstream: the tensors of `ckpt_path` that the models do not replace (the VAE when `vae` is None, SD 2.x's
    last resblock and projection, EMA weights, ...) are copied over unchanged; without `ckpt_path`, `vae` is required.
    `epochs` / `steps` are not stored (a .safetensors file has no place for them; upstream writes them to .ckpt only).
    `save_dtype` is a numpy dtype cast tensor by tensor; None keeps the weights' dtype.
    """
    output_file = str(output_file)
    if not output_file.endswith(".safetensors"):
        raise ValueError(f"{output_file}: only .safetensors checkpoints are written")
    if ckpt_path is None and vae is None:
        raise ValueError("save_stable_diffusion_checkpoint: pass vae (there is no ckpt_path to take the VAE from)")
    state_dict = sd_state_dict(v2, text_encoder, unet, vae, save_dtype, make_dummy_weights=ckpt_path is None)
    metadata = dict(metadata or {})
    if ckpt_path is not None:
        reader = CheckpointReader(ckpt_path)
        for key in reader.keys:
            current = TE_V1_PREFIX + _te_v1_name(key[len(TE_V1_PREFIX):]) if key.startswith(TE_V1_PREFIX) else key
            if current not in state_dict:
                state_dict[current] = reader.get(key)
        if CONFIG_METADATA_KEY in reader.metadata:  # the architecture travels with the weights
            metadata.setdefault(CONFIG_METADATA_KEY, reader.metadata[CONFIG_METADATA_KEY])
    write_safetensors(output_file, state_dict, metadata or None)
    return len(state_dict)
