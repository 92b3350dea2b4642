"""SDXL specifics of training: model loading, size conditioning, SDXL-only flags and checks."""

import logging
import os

from mindspore import ops

from library import diffusers_loading, sdxl_model_util
from library.sdxl_original_unet import timestep_embedding

logger = logging.getLogger(__name__)

SIZE_EMBEDDING_DIM = 256  # per value; 6 values (original hw, crop tl, target hw) -> 1536


def add_sdxl_training_arguments(parser):
    parser.add_argument(
        "--cache_text_encoder_outputs", action="store_true", help="cache the outputs of the text encoders"
    )
    parser.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help="cache the outputs of the text encoders to disk (<stem>_te_outputs.npz)",
    )
    parser.add_argument(
        "--disable_mmap_load_safetensors",
        action="store_true",
        help="accepted for compatibility; checkpoints are always read fully into host memory here",
    )


def verify_sdxl_training_args(args):
    """Upstream's SDXL checks, as errors that name the flags."""
    if getattr(args, "v2", False):
        raise ValueError("--v2 cannot be used with SDXL training")
    if getattr(args, "clip_skip", None) is not None:
        logger.warning("--clip_skip has no effect for SDXL: both text encoders use their penultimate layer")
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True


def get_size_embeddings(original_sizes_hw, crop_top_lefts, target_sizes_hw):
    """(B, 1536) SDXL size conditioning: each of the six values embedded with 256 sinusoidal dims."""
    batch_size = original_sizes_hw.shape[0]
    parts = []
    for sizes in (original_sizes_hw, crop_top_lefts, target_sizes_hw):
        parts.append(timestep_embedding(sizes.reshape(-1), SIZE_EMBEDDING_DIM).reshape(batch_size, -1))
    return ops.cat(parts, axis=1)


def load_target_model(args, model_dtype=None):
    """(text_encoder1, text_encoder2, vae, unet, logit_scale) from `--pretrained_model_name_or_path` (+ `--vae`)."""
    path = args.pretrained_model_name_or_path
    if path is None:
        raise ValueError("--pretrained_model_name_or_path is required (a single-file SDXL .safetensors checkpoint or "
                         "a diffusers model folder)")
    te1, te2, vae, unet, logit_scale, _ = load_sdxl_models(path, "--pretrained_model_name_or_path", model_dtype)
    if getattr(args, "vae", None):
        vae = load_vae(args.vae, vae)
    return te1, te2, vae, unet, logit_scale


def load_sdxl_models(path: str, flag: str, dtype=None):
    """(text_encoder1, text_encoder2, vae, unet, logit_scale, ckpt_info) from a single-file SDXL checkpoint or a
    diffusers model folder; `flag` names the option in errors."""
    if os.path.isdir(path):
        if not diffusers_loading.is_diffusers_folder(path):
            raise ValueError(f"{flag} {path}: a folder without {diffusers_loading.MODEL_INDEX}, so not a diffusers "
                             "model folder")
        return diffusers_loading.load_models_from_diffusers_folder(path, dtype)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path} (hub ids need network access)")
    return sdxl_model_util.load_models_from_sdxl_checkpoint(path, dtype=dtype)


def load_vae(path: str, vae):
    """Replace the VAE weights from `--vae`: a single-file SDXL checkpoint, a VAE-only LDM/diffusers file, or a
    diffusers VAE folder (or a pipeline folder's vae/). From a whole checkpoint only the VAE's tensors are read."""
    from library.vae_conversion import convert_ldm_vae_checkpoint

    if os.path.isdir(path):
        return diffusers_loading.load_vae_from_diffusers_folder(path, vae)

    reader = sdxl_model_util.CheckpointReader(path)
    prefix = sdxl_model_util.VAE_PREFIX
    if any(key.startswith(prefix) for key in reader.keys):
        state_dict = convert_ldm_vae_checkpoint(
            {key[len(prefix):]: reader.get(key) for key in reader.keys if key.startswith(prefix)})
    else:
        tensors = {key: reader.get(key) for key in reader.keys}
        is_ldm = any(key.startswith("encoder.down.") for key in tensors)
        state_dict = convert_ldm_vae_checkpoint(tensors) if is_ldm else tensors
    sdxl_model_util.load_state_dict_into(vae, state_dict, f"--vae {path}")
    return vae

