"""Merge several LoRAs into one of a chosen rank by SVD (kohya-ss/sd-scripts' networks/svd_merge_lora.py).

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \
        --new_rank 16 [--new_conv_rank 8] --save_to merged.safetensors [--save_precision fp16]

Per module, the weighted sum of the inputs' updates (ratio * alpha / dim * up @ down) is approximated by its rank
--new_rank SVD (3x3 convs: --new_conv_rank), alpha = rank, the factors clipped at their 0.99 quantile as upstream.
Modules present in only some inputs are merged from those.
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import sai_model_spec  # noqa: E402
from networks import lora_io, lora_tools  # noqa: E402

logger = logging.getLogger(__name__)

CLAMP_QUANTILE = 0.99  # upstream's constant


def merge(args):
    lora_tools.check_merge_inputs(args.models, args.ratios, args.save_to)
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    save_dtype = lora_tools.PRECISIONS[args.save_precision or args.precision]

    loras, metadatas = lora_tools.read_loras(args.models, args.ratios)
    logger.info(f"new rank: {args.new_rank}, new conv rank: {new_conv_rank}")
    merged = lora_tools.svd_merge_loras(loras, args.new_rank, new_conv_rank, CLAMP_QUANTILE)

    v2, base_model = lora_tools.base_model_of(metadatas)
    network_args = {"conv_dim": new_conv_rank, "conv_alpha": new_conv_rank}
    metadata = lora_tools.minimum_network_metadata(v2, base_model, str(args.new_rank), str(args.new_rank), network_args)
    if not args.no_metadata:
        metadata.update(sai_model_spec.build_metadata(
            v_parameterization=v2 == "True", timestamp=time.time(), lora=True,  # upstream's guess: v2 means v-pred
            title=os.path.splitext(os.path.basename(args.save_to))[0],
            merged_from=lora_tools.merged_from(args.models)))
    lora_io.write_lora_file(args.save_to, lora_tools.cast_tensors(merged, save_dtype), metadata)
    logger.info(f"saved {args.save_to}")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision in saving, the same as --precision if omitted")
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                        help="precision of the saved factors when --save_precision is omitted (the SVD itself "
                             "always runs in float32/float64)")
    parser.add_argument("--save_to", type=str, default=None, help="output file (.safetensors)")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge (.safetensors)")
    parser.add_argument("--ratios", type=float, nargs="*", help="ratio of each model")
    parser.add_argument("--new_rank", type=int, default=4, help="rank (dim) of the output LoRA")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of the output LoRA for Conv2d 3x3, the same as --new_rank if omitted")
    parser.add_argument("--device", type=str, default=None, help="accepted for compatibility; the SVD runs on the CPU")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimum ss_* metadata is saved)")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        merge(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
