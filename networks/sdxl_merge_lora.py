"""Merge LoRAs into an SDXL checkpoint, or into one LoRA (kohya-ss/sd-scripts' networks/sdxl_merge_lora.py).

    # into a checkpoint: W += ratio * alpha / dim * up @ down, LoRA after LoRA
    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models a.safetensors b.safetensors \
        --ratios 0.8 0.5 --save_to merged_model.safetensors [--precision float] [--save_precision fp16]

    # into one LoRA: same-rank weighted sum of the factors, or --concat for the exact sum at the summed rank
    python networks/sdxl_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --concat \
        --save_to merged_lora.safetensors

Into a LoRA, each ratio multiplies both factors as upstream, so a LoRA enters with ratio * |ratio|.
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md

import mindspore as ms  # noqa: E402

from library import sai_model_spec, sdxl_model_util  # noqa: E402
from networks import lora, lora_io, lora_tools  # noqa: E402

logger = logging.getLogger(__name__)

LOAD_DTYPES = {"float": None, "fp16": ms.float16, "bf16": ms.bfloat16}  # None: the checkpoint's float32 weights


def merge_to_sd_model(args):
    """Load the checkpoint, merge every LoRA into its weights, save it (with modelspec metadata as upstream)."""
    for path in args.models:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--models: LoRA file not found: {path}")
    logger.info(f"loading SDXL model {args.sd_model}")
    te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(
        args.sd_model, LOAD_DTYPES[args.precision])
    for path, ratio in zip(args.models, args.ratios):
        logger.info(f"merging {path} with ratio {ratio}")
        merger, weights_sd = lora.create_network_from_weights(ratio, path, vae, [te1, te2], unet, for_inference=True)
        try:
            merger.merge_to(weights_sd)
        except ValueError as e:  # merge_to names the module; the user also needs the file
            raise ValueError(f"{path}: {e}") from e

    # the model config entry lets a non-base architecture (e.g. configs/tiny_sdxl.json) load again
    source_metadata = lora_io.read_metadata(args.sd_model)
    metadata = {key: value for key, value in source_metadata.items() if key == sdxl_model_util.CONFIG_METADATA_KEY}
    if not args.no_metadata:
        metadata.update(sai_model_spec.build_metadata(
            v_parameterization=False, timestamp=time.time(), lora=False,
            title=os.path.splitext(os.path.basename(args.save_to))[0],
            merged_from=lora_tools.merged_from([args.sd_model] + args.models)))
    save_dtype = lora_tools.PRECISIONS[args.save_precision] if args.save_precision else None
    logger.info(f"saving SDXL model to {args.save_to}")
    sdxl_model_util.save_stable_diffusion_checkpoint(args.save_to, te1, te2, unet, vae, logit_scale,
                                                     metadata=metadata or None, save_dtype=save_dtype)


def merge_to_lora(args):
    loras, metadatas = lora_tools.read_loras(args.models, args.ratios)
    merged = lora_tools.merge_loras(loras, concat=args.concat, shuffle=args.shuffle)
    v2, base_model = lora_tools.base_model_of(metadatas)
    metadata = lora_tools.minimum_network_metadata(v2, base_model, *lora_tools.summarize_dims(merged))
    if not args.no_metadata:
        metadata.update(sai_model_spec.build_metadata(
            v_parameterization=False, timestamp=time.time(), lora=True,
            title=os.path.splitext(os.path.basename(args.save_to))[0], merged_from=lora_tools.merged_from(args.models)))
    save_dtype = lora_tools.PRECISIONS[args.save_precision or args.precision]
    lora_io.write_lora_file(args.save_to, lora_tools.cast_tensors(merged, save_dtype), metadata)
    logger.info(f"saved {args.save_to}")


def merge(args):
    lora_tools.check_merge_inputs(args.models, args.ratios, args.save_to)
    if args.sd_model is not None:
        merge_to_sd_model(args)
    else:
        merge_to_lora(args)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision in saving, the same as merging if omitted")
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                        help="precision of the checkpoint's weights while merging (float is recommended; each delta "
                             "is computed in float32)")
    parser.add_argument("--sd_model", type=str, default=None,
                        help="checkpoint (.safetensors) to merge into; LoRAs are merged into one LoRA if omitted")
    parser.add_argument("--save_to", type=str, default=None, help="output file (.safetensors)")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge (.safetensors)")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio of each model")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimum ss_* metadata is saved for a LoRA)")
    parser.add_argument("--concat", action="store_true",
                        help="concatenate the LoRAs' ranks instead of summing their factors (the output rank is "
                             "the sum of the input ranks)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rank order of the merged LoRA")
    return parser


def main(argv=None, parser=None, merge_models=merge):
    """The command line; `parser` and `merge_models` let networks/merge_lora.py (SD 1.x/2.x) run its own."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = (parser or setup_parser()).parse_args(argv)
    try:
        merge_models(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
