"""Merge LoRAs into an SD 1.x / 2.x checkpoint, or into one LoRA (kohya-ss/sd-scripts' networks/merge_lora.py).

    python networks/merge_lora.py --sd_model v1-5-pruned.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 --save_to merged_model.safetensors [--v2] [--precision float] [--save_precision fp16]
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --save_to merged_lora.safetensors

`networks/sdxl_merge_lora.py` with SD's models: the same flags plus `--v2`, the same merge into a LoRA.
"""

import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md

from library import model_util, sai_model_spec  # noqa: E402
from networks import lora, lora_tools, sdxl_merge_lora  # noqa: E402

logger = logging.getLogger(__name__)


def merge_to_sd_model(args):
    """Load the checkpoint, merge every LoRA into its weights, save it (modelspec metadata as upstream's)."""
    for path in args.models:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--models: LoRA file not found: {path}")
    if os.path.isfile(args.sd_model) and model_util.is_sdxl_checkpoint(args.sd_model):
        raise ValueError(f"--sd_model {args.sd_model}: an SDXL checkpoint; use networks/sdxl_merge_lora.py")
    logger.info(f"loading SD {'2.x' if args.v2 else '1.x'} model {args.sd_model}")
    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(
        args.v2, args.sd_model, sdxl_merge_lora.LOAD_DTYPES[args.precision])
    for path, ratio in zip(args.models, args.ratios):
        logger.info(f"merging {path} with ratio {ratio}")
        merger, weights_sd = lora.create_network_from_weights(ratio, path, vae, [text_encoder], unet,
                                                              for_inference=True)
        try:
            merger.merge_to(weights_sd)
        except ValueError as e:  # merge_to names the module; the user also needs the file
            raise ValueError(f"{path}: {e}") from e

    metadata = None
    if not args.no_metadata:
        metadata = sai_model_spec.build_metadata(
            v_parameterization=args.v2, v2=args.v2, sdxl=False, timestamp=time.time(), lora=False,
            title=os.path.splitext(os.path.basename(args.save_to))[0],
            merged_from=lora_tools.merged_from([args.sd_model] + args.models))
    save_dtype = lora_tools.PRECISIONS[args.save_precision] if args.save_precision else None
    logger.info(f"saving SD model to {args.save_to}")
    # the source checkpoint supplies what the models do not hold (and the tiny configs' model config entry)
    model_util.save_stable_diffusion_checkpoint(args.v2, args.save_to, text_encoder, unet, args.sd_model, 0, 0,
                                                metadata=metadata, save_dtype=save_dtype, vae=vae)


def merge(args):
    lora_tools.check_merge_inputs(args.models, args.ratios, args.save_to)
    if args.sd_model is not None:
        merge_to_sd_model(args)
    else:
        sdxl_merge_lora.merge_to_lora(args)


def setup_parser():
    parser = sdxl_merge_lora.setup_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--v2", action="store_true", help="the checkpoint is SD 2.x")
    return parser


def main(argv=None):
    sdxl_merge_lora.main(argv, setup_parser(), merge)


if __name__ == "__main__":
    main()
