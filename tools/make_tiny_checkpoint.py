"""Write a random single-file SDXL or SD 1.x / 2.x checkpoint with the real key layout, from a model config.

    python tools/make_tiny_checkpoint.py --output tiny_sdxl.safetensors            # configs/tiny_sdxl.json
    python tools/make_tiny_checkpoint.py --config tiny_sd1 --output tiny_sd1.safetensors   # or tiny_sd2, sd_v1, sd_v2
    python tools/make_tiny_checkpoint.py --config path/to/config.json --output x.safetensors --seed 1

SDXL keys follow SDXL base's SGM layout exactly (UNet `model.diffusion_model.*`, CLIP-L
`conditioner.embedders.0.transformer.*`, OpenCLIP bigG `conditioner.embedders.1.model.*`, LDM VAE
`first_stage_model.*`); SD 1.x / 2.x keys the LDM layout of SD 1.5 / 2.1 (UNet `model.diffusion_model.*`, CLIP-L
`cond_stage_model.transformer.*` or OpenCLIP-H `cond_stage_model.model.*`, VAE `first_stage_model.*`). SD configs
have a `text_encoder` section and say `"v2"`; SDXL configs have `text_encoder_1` / `text_encoder_2`. The config is
stored in the metadata so the loaders rebuild the same architecture.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402

from library import model_util, sdxl_model_util  # noqa: E402

OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's initial value


def make_tiny_checkpoint(output: str, config_name: str = "tiny_sdxl", seed: int = 0) -> dict:
    """Build random models from the config and save them; returns the config used."""
    config = sdxl_model_util.load_model_config(config_name)
    ms.set_seed(seed)
    metadata = {sdxl_model_util.CONFIG_METADATA_KEY: json.dumps(config)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if "text_encoder" in config:  # SD 1.x / 2.x
        text_encoder, vae, unet = model_util.build_sd_models(config)
        model_util.save_stable_diffusion_checkpoint(config["v2"], output, text_encoder, unet, None, 0, 0,
                                                    metadata=metadata, vae=vae)
    else:
        te1, te2, vae, unet = sdxl_model_util.build_models(config)
        sdxl_model_util.save_stable_diffusion_checkpoint(
            output, te1, te2, unet, vae, logit_scale=OPENCLIP_LOGIT_SCALE, metadata=metadata
        )
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_sdxl",
                        help="config name in configs/ (tiny_sdxl, tiny_sd1, tiny_sd2, sdxl_base, sd_v1, sd_v2) or a "
                             "JSON path")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    make_tiny_checkpoint(args.output, args.config, args.seed)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
