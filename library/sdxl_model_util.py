"""SDXL single-file checkpoints <-> MindSpore models.

A single-file SDXL checkpoint (SGM layout) holds four models under four prefixes:

    model.diffusion_model.*                 UNet, SGM names (== our UNet's parameter names)
    conditioner.embedders.0.transformer.*   CLIP-L text encoder, HF names (== ours)
    conditioner.embedders.1.model.*         OpenCLIP bigG text encoder (converted to HF names and back)
    first_stage_model.*                     VAE, LDM names (converted to diffusers names and back)

Loading is strict per model: a key under a model's prefix that the model does not have, a parameter
the checkpoint lacks, or a shape mismatch is an error that names the keys. Keys under no known prefix
belong to no model we build (upstream ignores them too); they are listed in a log line.

Loading streams: every key and shape is checked first (from the file header, nothing read), then tensors are read
one at a time (the VAE's, small, as one group: its conversion counts decoder levels over all its keys), converted,
cast and placed into models built without data. The peak is the models in their target dtype plus about one
tensor and one read window. Saving casts tensor by tensor, so the only copy is the state dict in the save dtype.

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
from library.vae_conversion import convert_ldm_vae_checkpoint, convert_vae_state_dict
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


def state_dict_of(cell, dtype=None) -> dict:
    """{parameter name: numpy array} of a cell; `dtype` (numpy) casts tensor by tensor, never the whole cell at once."""
    state_dict = {}
    for name, param in cell.parameters_and_names():
        value = param.asnumpy()
        state_dict[name] = value if dtype is None else value.astype(dtype, copy=False)
    return state_dict


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


class CheckpointReader:
    """The tensors of a .safetensors file, read one at a time.

    safe_open maps the file, and every page a read touches stays in this process's resident memory until the map is
    closed: read through one map, a 7 GB checkpoint would add 7 GB to the peak RSS on top of the models. Reopening
    the file after every `window_bytes` read bounds that to one window.
    """

    def __init__(self, path: str, window_bytes: int = 32 * 1024 * 1024):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        self.path = path
        self.window_bytes = window_bytes
        self._open()
        self.metadata = self._file.metadata() or {}
        self.keys = self._file.offset_keys()  # file order: reads go forward through the file

    def _open(self):
        try:
            self._file = safe_open(self.path, framework="np")
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"{self.path}: not a readable .safetensors file ({e})") from e
        self._bytes_read = 0

    def shape(self, key: str) -> tuple:
        """From the header: reads no data."""
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            tensor = self._file.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read '{key}' ({e})") from e
        self._bytes_read += tensor.nbytes
        if self._bytes_read >= self.window_bytes:
            self._file = None  # dropping the handle unmaps the file and its pages leave this process's RSS
            self._open()
        return tensor


def check_state_dict_shapes(cell, shapes: dict, what: str):
    """Strict check of {name: shape} against the cell's parameters: an error names every missing and unexpected
    key, or the first mis-shaped one."""
    check_shapes({name: tuple(param.shape) for name, param in cell.parameters_and_names()}, shapes, what)


def check_shapes(expected: dict, shapes: dict, what: str):
    """Strict check of {name: shape} against {name: expected shape}, as check_state_dict_shapes."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        lines = [f"{what}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise CheckpointError("\n".join(lines))
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(
                f"{what}: shape mismatch for '{name}': checkpoint {tuple(shapes[name])}, model {tuple(shape)}"
            )


def assign_parameter(param, value: np.ndarray, dtype=None):
    """Set a parameter from a numpy array cast to `dtype` (a mindspore dtype; None: the parameter's own).

    The parameter takes the dtype first: set_data casts incoming data to the parameter's dtype, and a parameter
    built without data (build_models(allocate=False)) changes dtype without allocating anything.
    """
    if dtype is not None and param.dtype != dtype:
        param.set_dtype(dtype)
    # order="C" keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    param.set_data(ms.Tensor(np.asarray(value, order="C"), dtype=param.dtype))


def load_state_dict_into(cell, state_dict: dict, what: str, dtype=None):
    """Copy numpy arrays into the cell's parameters, strictly: every key and every shape must match."""
    check_state_dict_shapes(cell, {name: np.shape(value) for name, value in state_dict.items()}, what)
    for name, param in cell.parameters_and_names():
        assign_parameter(param, state_dict[name], dtype)


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


def _shape_stub(shape) -> np.ndarray:
    """A zero-stride array of `shape`: the name conversions rename, split and transpose it without any data."""
    return np.broadcast_to(np.zeros((), np.float16), shape)


def _te2_to_hf(openclip_sd: dict) -> dict:
    return convert_sdxl_text_encoder_2_checkpoint(openclip_sd)[0]


def _identity(state_dict: dict) -> dict:
    return state_dict


def load_models_from_sdxl_checkpoint(path: str, dtype=None, config: dict = None):
    """Load a single-file SDXL `.safetensors` checkpoint.

    Returns (text_encoder1, text_encoder2, vae, unet, logit_scale, ckpt_info) as upstream; `ckpt_info` is
    None (safetensors files carry no epoch/step). `dtype` (a mindspore dtype) casts every weight; None keeps
    the models' fp32.
    """
    reader = CheckpointReader(path)
    if config is None:
        metadata = reader.metadata
        config = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else load_model_config()
    # {name in the model's checkpoint layout: full key}
    unet_keys, te1_keys, te2_keys, vae_keys, other = split_checkpoint({key: key for key in reader.keys})
    if other:
        logger.info("%s: ignoring %d keys that belong to no SDXL model: %s", path, len(other), ", ".join(other[:10]))
    if not unet_keys:
        raise CheckpointError(f"{path}: no '{UNET_PREFIX}*' keys; is this a single-file SDXL checkpoint?")
    logit_scale_key = te2_keys.pop("logit_scale", None)  # OpenCLIP's, not a parameter of the HF text encoder

    te1, te2, vae, unet = build_models(config, allocate=False)
    # (model, its keys, conversion to the model's names, whether the conversion needs all its tensors at once)
    parts = [
        (unet, unet_keys, _identity, False, f"{path} (UNet, '{UNET_PREFIX}*')"),
        (te1, te1_keys, _identity, False, f"{path} (text encoder 1, '{TE1_PREFIX}*')"),
        (te2, te2_keys, _te2_to_hf, False, f"{path} (text encoder 2, '{TE2_PREFIX}*')"),
        (vae, vae_keys, convert_ldm_vae_checkpoint, True, f"{path} (VAE, '{VAE_PREFIX}*')"),
    ]
    # everything is checked before any tensor is read, so a bad file fails fast and by name
    for model, keys, convert, _, what in parts:
        try:
            converted = convert({name: _shape_stub(reader.shape(key)) for name, key in keys.items()})
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        check_state_dict_shapes(model, {name: value.shape for name, value in converted.items()}, what)

    for model, keys, convert, whole_model, _ in parts:
        params = dict(model.parameters_and_names())
        groups = [keys] if whole_model else [{name: key} for name, key in keys.items()]
        for group in groups:
            for name, value in convert({name: reader.get(key) for name, key in group.items()}).items():
                assign_parameter(params[name], value, dtype)
    logit_scale = reader.get(logit_scale_key) if logit_scale_key else None
    return te1, te2, vae, unet, logit_scale, None


def sdxl_state_dict(text_encoder1, text_encoder2, unet, vae, logit_scale=None, dtype=None) -> dict:
    """The single-file checkpoint state dict (numpy) of the four models; `dtype` (numpy) casts tensor by tensor."""
    if logit_scale is not None and dtype is not None:
        logit_scale = np.asarray(logit_scale, dtype=dtype)
    state_dict = {}
    for prefix, part in (
        (UNET_PREFIX, state_dict_of(unet, dtype)),
        (TE1_PREFIX, state_dict_of(text_encoder1, dtype)),
        (TE2_PREFIX, convert_text_encoder_2_state_dict_to_sdxl(state_dict_of(text_encoder2, dtype), logit_scale)),
        (VAE_PREFIX, convert_vae_state_dict(state_dict_of(vae, dtype))),
    ):
        state_dict.update({prefix + key: value for key, value in part.items()})
    return state_dict


def save_stable_diffusion_checkpoint(output_file, text_encoder1, text_encoder2, unet, vae, logit_scale=None,
                                     metadata=None, save_dtype=None):
    """Write the four models as one SGM-layout `.safetensors` file (temp name, then rename).

    `save_dtype` is a numpy dtype (e.g. np.float16 or ml_dtypes.bfloat16); None keeps the weights' dtype. The
    weights are cast one tensor at a time, so saving fp16 holds one fp16 copy of the models, never an fp32 one.
    """
    state_dict = sdxl_state_dict(text_encoder1, text_encoder2, unet, vae, logit_scale, save_dtype)
    write_safetensors(output_file, state_dict, metadata)


def write_safetensors(path, tensors: dict, metadata: dict = None):
    """Write atomically: a run killed mid-write leaves any previous file at `path` intact."""
    path = str(path)
    tmp_path = path + ".tmp"
    # np.asarray keeps 0-d tensors 0-d (np.ascontiguousarray would make them 1-d)
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, tmp_path, metadata=metadata)
    os.replace(tmp_path, path)
