"""Resize a LoRA to a lower rank by SVD (kohya-ss/sd-scripts' networks/resize_lora.py, same flags and output).

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8 [--new_conv_rank 4]
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32 \
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module becomes the best rank-r approximation of its update (alpha = old alpha / old rank * new rank). With
`--dynamic_method` each module gets the rank that keeps `--dynamic_param` of its singular values (sv_ratio: the
ones above max / param; sv_cumulative: that share of their sum; sv_fro: of the Frobenius norm), at most --new_rank.
"""

import argparse
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import lora_io, lora_tools  # noqa: E402

logger = logging.getLogger(__name__)


def resize(args):
    if not args.model:
        raise ValueError("--model: the LoRA file to resize is required")
    lora_tools.check_save_to(args.save_to)
    if args.dynamic_method and args.dynamic_param is None:
        raise ValueError("--dynamic_method needs --dynamic_param")
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    save_dtype = lora_tools.PRECISIONS[args.save_precision or "float"]

    tensors, metadata = lora_io.read_lora_file(args.model)
    if args.dynamic_method:
        logger.info(f"dynamic resize with {args.dynamic_method}: {args.dynamic_param}, max rank {args.new_rank}")
    resized, infos = lora_tools.resize_lora(tensors, args.new_rank, new_conv_rank, args.dynamic_method,
                                            args.dynamic_param, source=args.model)
    if args.verbose:
        print(verbose_report(infos, bool(args.dynamic_method)))

    old_dim = max(info.old_rank for info in infos)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = (f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} "
                                           f"from {old_dim}; {comment}")
        metadata["ss_network_dim"] = "Dynamic"
        metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv_desc = "" if args.new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        metadata["ss_training_comment"] = (f"dimension is resized from {old_dim} to {args.new_rank}{conv_desc}; "
                                           f"{comment}")
        metadata["ss_network_dim"] = str(args.new_rank)
        # upstream records the alpha of the last module resized
        metadata["ss_network_alpha"] = str(float(infos[-1].new_alpha))

    lora_io.write_lora_file(args.save_to, lora_tools.cast_tensors(resized, save_dtype), metadata)
    logger.info(f"saved {args.save_to}")


def verbose_report(infos, dynamic: bool) -> str:
    """Upstream's --verbose table: per module the shares of sum(S) and of the Frobenius norm kept, and S[0]/S[r-1]."""
    lines = [""]
    for info in infos:
        line = (f"{info.name:75} | sum(S) retained: {info.sum_retained:.1%}, fro retained: {info.fro_retained:.1%}, "
                f"max(S) ratio: {info.max_ratio:0.1f}")
        if dynamic:
            line += f", dynamic | dim: {info.new_rank}, alpha: {info.new_alpha}"
        lines.append(line)
    fro = [info.fro_retained for info in infos if not np.isnan(info.fro_retained)]  # zero modules have none
    lines.append(f"Average Frobenius norm retention: {np.mean(fro):.2%} | std: {np.std(fro):0.3f}")
    return "\n".join(lines)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision in saving, float if omitted")
    parser.add_argument("--new_rank", type=int, default=4, help="rank (dim) of the output LoRA")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of the output LoRA for Conv2d 3x3, the same as --new_rank if omitted")
    parser.add_argument("--save_to", type=str, default=None, help="output file (.safetensors)")
    parser.add_argument("--model", type=str, default=None, help="LoRA file to resize (.safetensors)")
    parser.add_argument("--device", type=str, default=None, help="accepted for compatibility; the SVD runs on the CPU")
    parser.add_argument("--verbose", action="store_true", help="print how much of each module is retained")
    parser.add_argument("--dynamic_method", type=str, default=None, choices=list(lora_tools.DYNAMIC_METHODS),
                        help="choose each module's rank dynamically; --new_rank is then the maximum")
    parser.add_argument("--dynamic_param", type=float, default=None, help="target of the dynamic method")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        resize(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
