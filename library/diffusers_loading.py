"""Diffusers-format SDXL model folders -> the project's models (SGM UNet, HF CLIP text encoders, diffusers VAE);
SD 1.x / 2.x folders at the end.

A folder as diffusers' `StableDiffusionXLPipeline.save_pretrained` writes it:

    model_index.json                  the pipeline's components and their classes (checked)
    unet/config.json + weights        diffusers UNet2DConditionModel names, renamed to our SGM names (table below)
    text_encoder/  "                  HF CLIPTextModel names: equal to ours
    text_encoder_2/  "                HF CLIPTextModelWithProjection: equal to ours (`text_projection.weight` is
                                      already an HF Linear weight, so it is not transposed as the single file's is)
    vae/  "                           diffusers AutoencoderKL: equal to ours
    tokenizer/, tokenizer_2/, scheduler/   not read: the tokenizers are the project's (configs/tokenizer), which
                                      are SDXL's; a text encoder with another vocabulary size is refused instead

Weights are `diffusion_pytorch_model.safetensors` (UNet, VAE) or `model.safetensors` (text encoders), the fp16
variant `*.fp16.safetensors`, or shards listed in `*.safetensors.index[.fp16].json`; `.bin` files (torch pickles)
are refused. With dtype fp16 the fp16 variant is preferred, as upstream asks diffusers for `variant="fp16"`;
otherwise the full-precision files, falling back to the other kind when only one exists.

The model configs are built from each `config.json`; a field our models cannot honour (a value that changes the
computation, or an unsupported block layout) is an error naming the file and the field, and anything that changes
a weight's shape is caught by the strict key and shape check. Loading streams as the single-file loader does:
every key and shape is checked from the file headers first, then tensors are read, cast and placed one at a time.
"""

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import mindspore as ms

from library import model_util, sdxl_model_util
from library.sdxl_model_util import CheckpointError, CheckpointReader

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# component folder -> (class in model_index.json, weights file stem)
COMPONENTS = {
    "unet": ("UNet2DConditionModel", "diffusion_pytorch_model"),
    "text_encoder": ("CLIPTextModel", "model"),
    "text_encoder_2": ("CLIPTextModelWithProjection", "model"),
    "vae": ("AutoencoderKL", "diffusion_pytorch_model"),
}
TE_IGNORED_KEYS = sdxl_model_util.TE1_IGNORED_KEYS  # the position_ids buffer, which older transformers saved

# --- UNet names: SGM <-> diffusers ---------------------------------------------------------------------------------
# One table of block pairs, built from the UNet config, serves both directions. Within a block the names are equal
# (attention blocks, single layers), except in resnets, whose inner layers are renamed with this table.
_RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_block_table(unet_config: dict) -> List[Tuple[str, str, Optional[Dict[str, str]]]]:
    """(SGM block, diffusers block, resnet layer renames or None) for every block of a UNet config.

    SGM numbers the blocks of all levels in one sequence: input block 0 is conv_in, then each down level has
    num_res_blocks blocks (resnet [+ transformer]) and, except the last, a downsampler block; output blocks run
    from the deepest level up, num_res_blocks + 1 per level, the last of a level also holding the upsampler.
    """
    n = unet_config["num_res_blocks"]
    levels = len(unet_config["channel_mult"])
    has_attention = [depth > 0 for depth in unet_config["transformer_depth"]]
    table = [
        ("time_embed.0", "time_embedding.linear_1", None), ("time_embed.2", "time_embedding.linear_2", None),
        ("label_emb.0.0", "add_embedding.linear_1", None), ("label_emb.0.2", "add_embedding.linear_2", None),
        ("input_blocks.0.0", "conv_in", None), ("out.0", "conv_norm_out", None), ("out.2", "conv_out", None),
        ("middle_block.0", "mid_block.resnets.0", _RESNET_LAYERS), ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", _RESNET_LAYERS),
    ]
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            table.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", _RESNET_LAYERS))
            if has_attention[level]:
                table.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", None))
        if level < levels - 1:
            table.append((f"input_blocks.{(level + 1) * (n + 1)}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                          None))
    for up in range(levels):
        level = levels - 1 - up  # diffusers' up_blocks[0] is the deepest level
        for j in range(n + 1):
            block = up * (n + 1) + j
            table.append((f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", _RESNET_LAYERS))
            if has_attention[level]:
                table.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}", None))
            if level > 0 and j == n:
                slot = 2 if has_attention[level] else 1
                table.append((f"output_blocks.{block}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv", None))
    return table


class UnetKeyMap:
    """Renames UNet parameter keys between SGM and diffusers names for one UNet config; None for a key that is no
    parameter name of that layout."""

    def __init__(self, unet_config: dict):
        table = unet_block_table(unet_config)
        self._sgm_blocks = {sgm: (diffusers, layers) for sgm, diffusers, layers in table}
        self._diffusers_blocks = {
            diffusers: (sgm, None if layers is None else {d: s for s, d in layers.items()})
            for sgm, diffusers, layers in table
        }

    def to_diffusers(self, sgm_key: str) -> Optional[str]:
        return _rename(sgm_key, self._sgm_blocks)

    def to_sgm(self, diffusers_key: str) -> Optional[str]:
        return _rename(diffusers_key, self._diffusers_blocks)


def _rename(key: str, blocks: dict) -> Optional[str]:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest block path that is a prefix of the key
        block = ".".join(parts[:cut])
        if block in blocks:
            target, layers = blocks[block]
            rest = ".".join(parts[cut:])
            if layers is not None:
                layer, _, param = rest.rpartition(".")
                if layer not in layers:
                    return None
                rest = f"{layers[layer]}.{param}"
            return f"{target}.{rest}"
    return None


# --- configs -------------------------------------------------------------------------------------------------------
# Fields that change what a model computes, with the only value our models implement. Diffusers writes every field;
# one that is absent is not checked.
_UNET_FIXED_FIELDS = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
    "time_embedding_type": "positional", "use_linear_projection": True,
}
_VAE_FIXED_FIELDS = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                     "mid_block_add_attention": True}


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


def _field(config: dict, field: str, path: str):
    if field not in config:
        raise CheckpointError(f"{path}: missing field '{field}'")
    return config[field]


def _check_fixed_fields(config: dict, fixed: dict, path: str):
    for field, expected in fixed.items():
        if field in config and config[field] != expected:
            raise CheckpointError(f"{path}: {field} is {config[field]!r}; only {expected!r} is supported (SDXL's)")


def _per_level(config: dict, field: str, levels: int, path: str) -> list:
    value = _field(config, field, path)
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels:
        raise CheckpointError(f"{path}: {field} has {len(values)} entries, block_out_channels {levels}")
    return values


def unet_config_from_diffusers(config: dict, path: str) -> dict:
    """Our UNet config (configs/*.json "unet") from a diffusers UNet2DConditionModel config.json."""
    _check_fixed_fields(config, _UNET_FIXED_FIELDS, path)
    channels = list(_field(config, "block_out_channels", path))
    levels = len(channels)
    down_types = _per_level(config, "down_block_types", levels, path)
    if any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down_types) or down_types[-1] == "DownBlock2D":
        raise CheckpointError(f"{path}: down_block_types {down_types}: expected DownBlock2D / CrossAttnDownBlock2D "
                              "levels with attention in the last one (SDXL's layout)")
    has_attention = [t == "CrossAttnDownBlock2D" for t in down_types]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)]
    if list(_field(config, "up_block_types", path)) != expected_up:
        raise CheckpointError(f"{path}: up_block_types {config['up_block_types']}: expected {expected_up}, "
                              "the mirror of down_block_types")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{path}: block_out_channels {channels} are not multiples of the first")
    depths = _per_level(config, "transformer_layers_per_block", levels, path)
    # diffusers' `attention_head_dim` is the number of heads when `num_attention_heads` is unset (its old naming)
    heads_field = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _per_level(config, heads_field, levels, path)
    head_channels = {channels[i] // heads[i] for i in range(levels) if has_attention[i]}
    if len(head_channels) != 1 or any(channels[i] % heads[i] for i in range(levels) if has_attention[i]):
        raise CheckpointError(f"{path}: {heads_field} {heads}: the SGM UNet needs the same channels per head "
                              f"at every level with attention (block_out_channels {channels})")
    return {
        "in_channels": _field(config, "in_channels", path),
        "out_channels": _field(config, "out_channels", path),
        "model_channels": channels[0],
        "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": _field(config, "layers_per_block", path),
        "transformer_depth": [d if a else 0 for d, a in zip(depths, has_attention)],
        "num_head_channels": head_channels.pop(),
        "context_dim": _field(config, "cross_attention_dim", path),
        "adm_in_channels": _field(config, "projection_class_embeddings_input_dim", path),
        "norm_num_groups": _field(config, "norm_num_groups", path),
    }


def _config_fields(config: dict, path: str, section: str) -> dict:
    """The fields of our config section (same names as HF's and diffusers' config.json) from a config.json."""
    return {field: _field(config, field, path) for field in sdxl_model_util.load_model_config()[section]}


def text_encoder_config_from_hf(config: dict, path: str, section: str) -> dict:
    """Our text encoder config ("text_encoder_1"/"text_encoder_2") from an HF CLIPTextConfig config.json."""
    fields = _config_fields(config, path, section)
    vocab_size = sdxl_model_util.load_model_config()[section]["vocab_size"]
    if fields["vocab_size"] != vocab_size:
        raise CheckpointError(f"{path}: vocab_size is {fields['vocab_size']}; the tokenizers here are SDXL's "
                              f"({vocab_size} tokens; added tokens are not supported)")
    return fields


def vae_config_from_diffusers(config: dict, path: str, family: str = "SDXL",
                              scaling_factor: float = sdxl_model_util.VAE_SCALE_FACTOR) -> dict:
    """Our VAE config from a diffusers AutoencoderKL config.json; the scale factor must be the model family's,
    which training and inference use as upstream does."""
    _check_fixed_fields(config, _VAE_FIXED_FIELDS, path)
    fields = _config_fields(config, path, "vae")
    if fields["scaling_factor"] != scaling_factor:
        raise CheckpointError(f"{path}: scaling_factor is {fields['scaling_factor']}; an {family} VAE has "
                              f"{scaling_factor} (another model's VAE?)")
    return fields


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def check_model_index(folder: str, components: dict = COMPONENTS,
                      expected: str = "only SDXL pipelines with both text encoders are supported"):
    """model_index.json names the pipeline's model components (`components`) with their classes; returns it."""
    path = os.path.join(folder, MODEL_INDEX)
    index = read_json(path)
    pipeline = index.get("_class_name", "?")
    for component, (class_name, _) in components.items():
        entry = index.get(component)
        if not entry or entry[-1] is None:
            raise CheckpointError(f"{path}: no '{component}' component ({pipeline}); {expected}")
        if entry[-1] != class_name:
            raise CheckpointError(f"{path}: '{component}' is {entry[-1]}, expected {class_name}")
    return index


def model_config_from_diffusers_folder(folder: str) -> dict:
    """The project's model config (as configs/*.json) built from the folder's config.json files."""
    def config_of(component):
        path = os.path.join(folder, component, "config.json")
        return read_json(path), path

    return {
        "name": os.path.basename(os.path.normpath(folder)),
        "unet": unet_config_from_diffusers(*config_of("unet")),
        "vae": vae_config_from_diffusers(*config_of("vae")),
        "text_encoder_1": text_encoder_config_from_hf(*config_of("text_encoder"), "text_encoder_1"),
        "text_encoder_2": text_encoder_config_from_hf(*config_of("text_encoder_2"), "text_encoder_2"),
    }


# --- weights -------------------------------------------------------------------------------------------------------

def weight_files(component_dir: str, stem: str, prefer_fp16: bool = False) -> Tuple[str, List[str]]:
    """(the file to name in messages, the .safetensors files holding the weights) of a component folder."""
    single = {"": f"{stem}.safetensors", "fp16": f"{stem}.fp16.safetensors"}
    index = {"": f"{stem}.safetensors.index.json", "fp16": f"{stem}.safetensors.index.fp16.json"}
    for variant in (("fp16", "") if prefer_fp16 else ("", "fp16")):
        path = os.path.join(component_dir, single[variant])
        if os.path.isfile(path):
            return path, [path]
        path = os.path.join(component_dir, index[variant])
        if os.path.isfile(path):
            shards = sorted(set(_field(read_json(path), "weight_map", path).values()))
            return path, [os.path.join(component_dir, shard) for shard in shards]
    pickles = sorted(f for f in os.listdir(component_dir) if f.endswith(".bin")) if os.path.isdir(component_dir) else []
    if pickles:
        raise CheckpointError(f"{os.path.join(component_dir, pickles[0])}: .bin weights (torch pickles) are not "
                              f"supported; save them as .safetensors (diffusers' save_pretrained does by default)")
    raise FileNotFoundError(f"{os.path.join(component_dir, single[''])}: file not found (nor a .fp16 variant or "
                            "a shard index)")


class WeightFiles:
    """The tensors of one component's .safetensors files (one file or shards), read one at a time."""

    def __init__(self, component_dir: str, stem: str, prefer_fp16: bool = False, ignored_keys=()):
        self.name, paths = weight_files(component_dir, stem, prefer_fp16)
        self.readers = [CheckpointReader(path) for path in paths]
        self.ignored_keys = set(ignored_keys)

    def shapes(self) -> Dict[str, tuple]:
        shapes = {}
        for reader in self.readers:
            for key in reader.keys:
                if key in shapes:
                    raise CheckpointError(f"{self.name}: '{key}' is in two shards")
                if key not in self.ignored_keys:
                    shapes[key] = reader.shape(key)
        return shapes

    def tensors(self):
        for reader in self.readers:
            for key in reader.keys:
                if key not in self.ignored_keys:
                    yield key, reader.get(key)


def _check_component(model, weights: WeightFiles, to_file_key):
    """Every key and shape of the files against the model's, in the files' names; reads headers only."""
    expected = {to_file_key(name): tuple(param.shape) for name, param in model.parameters_and_names()}
    sdxl_model_util.check_shapes(expected, weights.shapes(), weights.name)


def _copy_component(model, weights: WeightFiles, to_model_key, dtype=None):
    params = dict(model.parameters_and_names())
    for key, tensor in weights.tensors():
        sdxl_model_util.assign_parameter(params[to_model_key(key)], tensor, dtype)


def _same_name(key: str) -> str:
    return key


def load_models_from_diffusers_folder(folder: str, dtype=None):
    """Load an SDXL diffusers folder; returns (text_encoder1, text_encoder2, vae, unet, logit_scale, ckpt_info) as
    load_models_from_sdxl_checkpoint, logit_scale and ckpt_info None (diffusers keeps neither). `dtype` (a mindspore
    dtype) casts every weight; None keeps fp32."""
    check_model_index(folder)
    config = model_config_from_diffusers_folder(folder)
    logger.info("%s: diffusers folder; tokenizer/ and tokenizer_2/ are not read (the project's SDXL tokenizers "
                "are used)", folder)
    te1, te2, vae, unet = sdxl_model_util.build_models(config, allocate=False)
    key_map = UnetKeyMap(config["unet"])
    prefer_fp16 = dtype == ms.float16
    parts = [
        (unet, "unet", key_map.to_diffusers, key_map.to_sgm, ()),
        (te1, "text_encoder", _same_name, _same_name, TE_IGNORED_KEYS),
        (te2, "text_encoder_2", _same_name, _same_name, TE_IGNORED_KEYS),
        (vae, "vae", _same_name, _same_name, ()),
    ]
    # every component's files are checked before any tensor is read: a bad folder fails fast, by name
    loads = []
    for model, component, to_file_key, to_model_key, ignored in parts:
        weights = WeightFiles(os.path.join(folder, component), COMPONENTS[component][1], prefer_fp16, ignored)
        _check_component(model, weights, to_file_key)
        loads.append((model, weights, to_model_key))
    for model, weights, to_model_key in loads:
        _copy_component(model, weights, to_model_key, dtype)
    return te1, te2, vae, unet, None, None


def load_vae_from_diffusers_folder(folder: str, vae):
    """Replace `vae`'s weights (in their dtype) from a diffusers VAE folder (config.json + weights) or from the vae/
    of a pipeline folder, strictly; its scale factor must be `vae`'s (the model family's)."""
    vae_dir = os.path.join(folder, "vae") if is_diffusers_folder(folder) else folder
    family = "SDXL" if vae.scaling_factor == sdxl_model_util.VAE_SCALE_FACTOR else "SD 1.x/2.x"
    vae_config_from_diffusers(read_json(os.path.join(vae_dir, "config.json")), os.path.join(vae_dir, "config.json"),
                              family, vae.scaling_factor)
    weights = WeightFiles(vae_dir, COMPONENTS["vae"][1])
    _check_component(vae, weights, _same_name)
    _copy_component(vae, weights, _same_name)
    return vae


# --- SD 1.x / 2.x folders (StableDiffusionPipeline) ----------------------------------------------------------------
# The SD UNet here is diffusers' own layout (library/original_unet.py), so every component keeps its file names.

SD_COMPONENTS = {name: COMPONENTS[name] for name in ("unet", "text_encoder", "vae")}
_SD_UNET_FIXED_FIELDS = {
    **{k: v for k, v in _UNET_FIXED_FIELDS.items()
       if k not in ("addition_embed_type", "addition_time_embed_dim", "use_linear_projection")},
    "addition_embed_type": None, "transformer_layers_per_block": 1,
}
_SD_UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                   "norm_num_groups")


def sd_unet_config_from_diffusers(config: dict, path: str) -> dict:
    """Our SD UNet config (configs/sd_v1.json "unet": diffusers' own field names) from a UNet config.json."""
    _check_fixed_fields(config, _SD_UNET_FIXED_FIELDS, path)
    fields = {field: _field(config, field, path) for field in _SD_UNET_FIELDS}
    levels = len(fields["block_out_channels"])
    expected_down = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    expected_up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
    for field, expected in (("down_block_types", expected_down), ("up_block_types", expected_up)):
        if list(_field(config, field, path)) != expected:
            raise CheckpointError(f"{path}: {field} {config[field]}: expected {expected} (SD 1.x/2.x's layout)")
    # diffusers' `attention_head_dim` is the number of heads when `num_attention_heads` is unset (its old naming)
    heads_field = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _field(config, heads_field, path)
    fields["attention_head_dim"] = heads if isinstance(heads, int) else _per_level(config, heads_field, levels, path)
    fields["use_linear_projection"] = bool(config.get("use_linear_projection", False))
    return fields


def sd_model_config_from_diffusers_folder(folder: str, v2: bool) -> dict:
    """The project's SD model config (as configs/sd_v1.json) from the folder's config.json files; `v2` must match
    the text encoder (SD 1.x: CLIP-L with quick_gelu; SD 2.x: OpenCLIP-H converted to CLIP, gelu)."""
    reference = sdxl_model_util.load_model_config("sd_v2" if v2 else "sd_v1")
    te_path = os.path.join(folder, "text_encoder", "config.json")
    te_config = read_json(te_path)
    text_encoder = {field: _field(te_config, field, te_path) for field in reference["text_encoder"]}
    if text_encoder["vocab_size"] != reference["text_encoder"]["vocab_size"]:
        raise CheckpointError(f"{te_path}: vocab_size is {text_encoder['vocab_size']}; the tokenizer here has "
                              f"{reference['text_encoder']['vocab_size']} tokens (added tokens are not supported)")
    if (text_encoder["hidden_act"] == "gelu") != v2:
        raise CheckpointError(f"{te_path}: hidden_act is {text_encoder['hidden_act']}, an SD "
                              f"{'1.x' if v2 else '2.x'} text encoder: {'drop' if v2 else 'add'} --v2")
    unet_path, vae_path = (os.path.join(folder, c, "config.json") for c in ("unet", "vae"))
    return {
        "name": os.path.basename(os.path.normpath(folder)), "v2": v2,
        "unet": sd_unet_config_from_diffusers(read_json(unet_path), unet_path),
        "vae": vae_config_from_diffusers(read_json(vae_path), vae_path, "SD 1.x/2.x",
                                         reference["vae"]["scaling_factor"]),
        "text_encoder": text_encoder,
    }


def load_sd_models_from_diffusers_folder(folder: str, v2: bool, dtype=None):
    """Load an SD 1.x / 2.x diffusers folder; returns (text_encoder, vae, unet) as
    model_util.load_models_from_stable_diffusion_checkpoint. `dtype` (a mindspore dtype) casts every weight."""
    index = check_model_index(folder, SD_COMPONENTS, "expected an SD 1.x/2.x pipeline (StableDiffusionPipeline)")
    if index.get("text_encoder_2"):
        raise CheckpointError(f"{os.path.join(folder, MODEL_INDEX)}: an SDXL pipeline (it has text_encoder_2): "
                              "use the sdxl_* scripts")
    config = sd_model_config_from_diffusers_folder(folder, v2)
    logger.info("%s: diffusers folder; tokenizer/ is not read (the project's CLIP tokenizer is used)", folder)
    text_encoder, vae, unet = model_util.build_sd_models(config, allocate=False)
    prefer_fp16 = dtype == ms.float16
    loads = []
    for model, component, ignored in ((unet, "unet", ()), (text_encoder, "text_encoder", TE_IGNORED_KEYS),
                                      (vae, "vae", ())):
        weights = WeightFiles(os.path.join(folder, component), SD_COMPONENTS[component][1], prefer_fp16, ignored)
        _check_component(model, weights, _same_name)
        loads.append((model, weights))
    for model, weights in loads:
        _copy_component(model, weights, _same_name, dtype)
    return text_encoder, vae, unet
