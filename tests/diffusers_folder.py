"""Write a diffusers-format SDXL folder (as StableDiffusionXLPipeline.save_pretrained does) or SD 1.x / 2.x folder
(StableDiffusionPipeline) from a single-file checkpoint, for tests of library/diffusers_loading.py.

    python tests/diffusers_folder.py --ckpt tiny.safetensors --output tiny_diffusers [--variant fp16] [--unet_shards 2]
    python tests/diffusers_folder.py --ckpt tiny_sd1.safetensors --output tiny_sd1_diffusers --sd [--v2]

The SDXL UNet keys are renamed with the loader's own table (SGM -> diffusers; its names are checked against real
diffusers names in test_diffusers_loading.py); the SD UNet, the text encoders and the VAE already carry HF /
diffusers names. The
config.json files are written here, field by field, as diffusers and transformers write them, independently of the
loader's reading of them.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import numpy as np  # noqa: E402

from library import model_util, sdxl_model_util  # noqa: E402
from library.diffusers_loading import UnetKeyMap  # noqa: E402

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_unet_config(unet: dict) -> dict:
    """A diffusers UNet2DConditionModel config.json for our UNet config (SDXL base's fields and values)."""
    channels = [unet["model_channels"] * m for m in unet["channel_mult"]]
    attention = [depth > 0 for depth in unet["transformer_depth"]]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        # diffusers' misnomer: for SDXL `attention_head_dim` holds the number of heads per level
        "attention_head_dim": [c // unet["num_head_channels"] for c in channels],
        "block_out_channels": channels, "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": unet["context_dim"], "cross_attention_norm": None,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": unet["in_channels"],
        "layers_per_block": unet["num_res_blocks"], "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": unet["norm_num_groups"], "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": unet["out_channels"],
        "projection_class_embeddings_input_dim": unet["adm_in_channels"], "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None,
        # SDXL writes 1 for its first level, which has no attention (diffusers ignores it there)
        "transformer_layers_per_block": [max(depth, 1) for depth in unet["transformer_depth"]],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "upcast_attention": None, "use_linear_projection": True,
    }


SD_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.19.0", "feature_extractor": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_sd_unet_config(unet: dict) -> dict:
    """A diffusers UNet2DConditionModel config.json for our SD UNet config (SD 1.5's / 2.1's fields and values)."""
    levels = len(unet["block_out_channels"])
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0", "act_fn": "silu",
        "attention_head_dim": unet["attention_head_dim"], "block_out_channels": unet["block_out_channels"],
        "center_input_sample": False, "cross_attention_dim": unet["cross_attention_dim"],
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": unet["in_channels"],
        "layers_per_block": unet["layers_per_block"], "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": unet["norm_num_groups"], "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": unet["out_channels"], "resnet_time_scale_shift": "default", "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "upcast_attention": False, "use_linear_projection": unet["use_linear_projection"],
    }


def hf_text_encoder_config(text_encoder: dict, class_name: str) -> dict:
    """A transformers CLIPTextConfig config.json (SDXL's TE1 has projection_dim 768 although it has no projection)."""
    config = {"architectures": [class_name], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
              "eos_token_id": 2, "initializer_factor": 1.0, "initializer_range": 0.02, "model_type": "clip_text_model",
              "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.32.0"}
    config.update(text_encoder)
    return config


def diffusers_vae_config(vae: dict) -> dict:
    levels = len(vae["block_out_channels"])
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.19.0", "act_fn": "silu",
              "down_block_types": ["DownEncoderBlock2D"] * levels, "force_upcast": True, "sample_size": 1024,
              "up_block_types": ["UpDecoderBlock2D"] * levels}
    config.update(vae)
    return config


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def _write_weights(component_dir, stem, tensors: dict, variant=None, shards=1):
    """`stem[.variant].safetensors`, or `shards` files with diffusers' names and a `.index[.variant].json`."""
    suffix = f".{variant}" if variant else ""
    if shards == 1:
        sdxl_model_util.write_safetensors(os.path.join(component_dir, f"{stem}{suffix}.safetensors"), tensors)
        return
    keys = list(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"{stem}{suffix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        sdxl_model_util.write_safetensors(os.path.join(component_dir, name), {keys[j]: tensors[keys[j]] for j in part})
        weight_map.update({keys[j]: name for j in part})
    total_size = int(sum(v.nbytes for v in tensors.values()))
    _write_json(os.path.join(component_dir, f"{stem}.safetensors.index{suffix}.json"),
                {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_diffusers_folder(ckpt_path: str, folder: str, variant: str = None, unet_shards: int = 1) -> str:
    """Write `folder` from a single-file checkpoint whose metadata holds its config (tools/make_tiny_checkpoint.py);
    `variant="fp16"` writes fp16 weights as `*.fp16.safetensors`."""
    config = json.loads(sdxl_model_util.CheckpointReader(ckpt_path).metadata[sdxl_model_util.CONFIG_METADATA_KEY])
    te1, te2, vae, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(ckpt_path)
    dtype = np.float16 if variant == "fp16" else None
    key_map = UnetKeyMap(config["unet"])
    unet_sd = {key_map.to_diffusers(k): v for k, v in sdxl_model_util.state_dict_of(unet, dtype).items()}
    te1_sd = sdxl_model_util.state_dict_of(te1, dtype)
    te1_sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # transformers <= 4.31 saved it
    components = {
        "unet": (diffusers_unet_config(config["unet"]), "diffusion_pytorch_model", unet_sd, unet_shards),
        "text_encoder": (hf_text_encoder_config(config["text_encoder_1"], "CLIPTextModel"), "model", te1_sd, 1),
        "text_encoder_2": (hf_text_encoder_config(config["text_encoder_2"], "CLIPTextModelWithProjection"), "model",
                           sdxl_model_util.state_dict_of(te2, dtype), 1),
        "vae": (diffusers_vae_config(config["vae"]), "diffusion_pytorch_model",
                sdxl_model_util.state_dict_of(vae, dtype), 1),
    }
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)
    for component, (component_config, stem, tensors, shards) in components.items():
        os.makedirs(os.path.join(folder, component), exist_ok=True)
        _write_json(os.path.join(folder, component, "config.json"), component_config)
        _write_weights(os.path.join(folder, component), stem, tensors, variant, shards)
    return folder


def write_sd_diffusers_folder(ckpt_path: str, folder: str, v2: bool) -> str:
    """Write an SD 1.x / 2.x `folder` from a single-file checkpoint whose metadata holds its config."""
    config = json.loads(sdxl_model_util.CheckpointReader(ckpt_path).metadata[sdxl_model_util.CONFIG_METADATA_KEY])
    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, ckpt_path)
    components = {
        "unet": (diffusers_sd_unet_config(config["unet"]), "diffusion_pytorch_model", unet),
        "text_encoder": (hf_text_encoder_config(config["text_encoder"], "CLIPTextModel"), "model", text_encoder),
        "vae": (diffusers_vae_config(config["vae"]), "diffusion_pytorch_model", vae),
    }
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "model_index.json"), SD_MODEL_INDEX)
    for component, (component_config, stem, model) in components.items():
        os.makedirs(os.path.join(folder, component), exist_ok=True)
        _write_json(os.path.join(folder, component, "config.json"), component_config)
        _write_weights(os.path.join(folder, component), stem, sdxl_model_util.state_dict_of(model))
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="single-file checkpoint (tools/make_tiny_checkpoint.py)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--variant", choices=["fp16"], default=None, help="write *.fp16.safetensors weights")
    parser.add_argument("--unet_shards", type=int, default=1, help="split the UNet weights into this many files")
    parser.add_argument("--sd", action="store_true", help="the checkpoint is SD 1.x (or with --v2 2.x), not SDXL")
    parser.add_argument("--v2", action="store_true", help="with --sd: an SD 2.x checkpoint")
    args = parser.parse_args(argv)
    if args.sd:
        write_sd_diffusers_folder(args.ckpt, args.output, args.v2)
    else:
        write_diffusers_folder(args.ckpt, args.output, args.variant, args.unet_shards)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
