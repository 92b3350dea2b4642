"""Write a random single-file SDXL checkpoint with the real key layout, from a model config.

    python tools/make_tiny_checkpoint.py --output tiny_sdxl.safetensors            # configs/tiny_sdxl.json
    python tools/make_tiny_checkpoint.py --config path/to/config.json --output x.safetensors --seed 1

The keys follow SDXL base's SGM layout exactly (UNet `model.diffusion_model.*`, CLIP-L
`conditioner.embedders.0.transformer.*`, OpenCLIP bigG `conditioner.embedders.1.model.*`, LDM VAE
`first_stage_model.*`); the config is stored in the metadata so the loader rebuilds the same architecture.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402

from library import sdxl_model_util  # noqa: E402

OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's initial value


def make_tiny_checkpoint(output: str, config_name: str = "tiny_sdxl", seed: int = 0) -> dict:
    """Build random models from the config and save them; returns the config used."""
    config = sdxl_model_util.load_model_config(config_name)
    ms.set_seed(seed)
    te1, te2, vae, unet = sdxl_model_util.build_models(config)
    metadata = {sdxl_model_util.CONFIG_METADATA_KEY: json.dumps(config)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    sdxl_model_util.save_stable_diffusion_checkpoint(
        output, te1, te2, unet, vae, logit_scale=OPENCLIP_LOGIT_SCALE, metadata=metadata
    )
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_sdxl", help="config name in configs/ or a JSON path")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    make_tiny_checkpoint(args.output, args.config, args.seed)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
