"""Extract a LoRA from the difference of a tuned and an original checkpoint (kohya-ss/sd-scripts'
networks/extract_lora_from_models.py): SD 1.x by default, `--v2` for SD 2.x, `--sdxl` for SDXL.

    python networks/extract_lora_from_models.py --sdxl --model_org sd_xl_base_1.0.safetensors \
        --model_tuned my_finetune.safetensors --dim 16 [--conv_dim 8] --save_to extracted.safetensors
    python networks/extract_lora_from_models.py --model_org v1-5-pruned.safetensors --model_tuned tuned.safetensors ...

For every layer a LoRA of `networks.lora` would target (--conv_dim adds the 3x3 convs), the difference tuned -
original is approximated by its rank --dim SVD (alpha = rank), the factors clipped at --clamp_quantile. The text
encoders are included only when some weight differs by more than --min_diff.
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from library import model_util, sai_model_spec, sdxl_model_util  # noqa: E402
from networks import lora, lora_io, lora_tools  # noqa: E402

logger = logging.getLogger(__name__)

LOAD_DTYPES = {None: None, "float": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def load_text_encoders_and_unet(path: str, load_dtype, sdxl: bool = True, v2: bool = False):
    """([text encoders], unet) of an SDXL, SD 1.x or (`v2`) SD 2.x checkpoint."""
    if sdxl:
        te1, te2, _, unet, _, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(path, load_dtype)
        return [te1, te2], unet
    text_encoder, _, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, path, load_dtype)
    return [text_encoder], unet


def load_targets(path: str, dim: int, conv_dim, load_dtype, sdxl: bool = True, v2: bool = False) -> dict:
    """{LoRA module name: layer} of a checkpoint's models: a LoRA network built on them names the layers exactly
    as upstream does (the network itself is not kept)."""
    logger.info(f"loading {path}")
    text_encoders, unet = load_text_encoders_and_unet(path, load_dtype, sdxl, v2)
    kwargs = {} if conv_dim is None else {"conv_dim": conv_dim, "conv_alpha": conv_dim}
    network = lora.create_network(1.0, dim, dim, None, text_encoders, unet, **kwargs)
    return {module.lora_name: module.org_module for module in network.loras}


def _weight(layer) -> np.ndarray:
    return layer.weight.asnumpy().astype(np.float32)


def weight_diffs(model_org: str, model_tuned: str, dim: int, conv_dim, load_dtype, sdxl: bool = True,
                 v2: bool = False) -> dict:
    """{LoRA module name: tuned - original weight}; only one checkpoint's models are loaded at a time."""
    diffs = {name: _weight(layer)
             for name, layer in load_targets(model_org, dim, conv_dim, load_dtype, sdxl, v2).items()}
    tuned = load_targets(model_tuned, dim, conv_dim, load_dtype, sdxl, v2)
    missing = sorted(set(diffs) ^ set(tuned))
    if missing:
        raise ValueError(f"{model_tuned}: its models do not have the layers of {model_org} (differing modules: "
                         + ", ".join(missing[:5]) + ")")
    for name, layer in tuned.items():
        weight = _weight(layer)
        if weight.shape != diffs[name].shape:
            raise ValueError(f"{model_tuned}: module {name} has shape {weight.shape}, {model_org} "
                             f"{diffs[name].shape}")
        diffs[name] = weight - diffs[name]
    return diffs


def drop_same_text_encoders(diffs: dict, min_diff: float) -> dict:
    """Upstream keeps the text encoder modules only when some weight changed by more than `min_diff`."""
    te_names = [name for name in diffs if name.startswith(lora.LORA_PREFIX_TEXT_ENCODER)]
    largest = max((float(np.max(np.abs(diffs[name]))) for name in te_names), default=0.0)
    if largest > min_diff:
        logger.info(f"Text encoder is different. {largest} > {min_diff}")
        return diffs
    logger.warning("Text encoder is same. Extract U-Net only.")
    return {name: diff for name, diff in diffs.items() if name not in te_names}


def extract(args):
    if args.v2 and args.sdxl:
        raise ValueError("--v2 and --sdxl cannot be given together")
    for flag, path in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: file not found: {path}")
        if not args.sdxl and model_util.is_sdxl_checkpoint(path):
            raise ValueError(f"{flag} {path}: an SDXL checkpoint; pass --sdxl (without it the models are read as "
                             "SD 1.x/2.x, as upstream)")
    lora_tools.check_save_to(args.save_to)
    if not 0 < args.clamp_quantile <= 1:
        raise ValueError(f"--clamp_quantile must be in (0, 1], got {args.clamp_quantile}")
    save_dtype = lora_tools.PRECISIONS[args.save_precision] if args.save_precision else None

    diffs = weight_diffs(args.model_org, args.model_tuned, args.dim, args.conv_dim, LOAD_DTYPES[args.load_precision],
                         args.sdxl, args.v2)
    diffs = drop_same_text_encoders(diffs, args.min_diff)
    logger.info("calculating by svd")
    tensors = lora_tools.extract_lora(diffs, args.dim, args.conv_dim, args.clamp_quantile)

    net_kwargs = {} if args.conv_dim is None else {"conv_dim": str(args.conv_dim),
                                                   "conv_alpha": str(float(args.conv_dim))}
    v_parameterization = args.v2 if args.v_parameterization is None else args.v_parameterization
    base_model = lora_tools.SDXL_BASE_MODEL_VERSION if args.sdxl else \
        model_util.get_model_version_str_for_sd1_sd2(args.v2, v_parameterization)
    metadata = lora_tools.minimum_network_metadata(str(args.v2), base_model, str(args.dim), str(float(args.dim)),
                                                   net_kwargs)
    if not args.no_metadata:
        metadata.update(sai_model_spec.build_metadata(
            v_parameterization=v_parameterization, v2=args.v2, sdxl=args.sdxl, timestamp=time.time(), lora=True,
            title=os.path.splitext(os.path.basename(args.save_to))[0]))
    if save_dtype is not None:
        tensors = lora_tools.cast_tensors(tensors, save_dtype)
    lora_io.write_lora_file(args.save_to, tensors, metadata)
    logger.info(f"LoRA weights are saved to: {args.save_to}")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", action="store_true", help="SD 2.x models (default without --sdxl: SD 1.x)")
    parser.add_argument("--v_parameterization", action="store_true", default=None,
                        help="write v-parameterization metadata (default: the same as --v2)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL models")
    parser.add_argument("--load_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision in loading, the checkpoint's if omitted")
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision in saving, float if omitted")
    parser.add_argument("--model_org", type=str, required=True, help="original checkpoint (.safetensors)")
    parser.add_argument("--model_tuned", type=str, required=True,
                        help="tuned checkpoint; the LoRA is the difference original -> tuned")
    parser.add_argument("--save_to", type=str, required=True, help="output file (.safetensors)")
    parser.add_argument("--dim", type=int, default=4, help="rank (dim) of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank of the LoRA for Conv2d 3x3 (default None: no conv 3x3 modules)")
    parser.add_argument("--device", type=str, default=None, help="accepted for compatibility; the SVD runs on the CPU")
    parser.add_argument("--clamp_quantile", type=float, default=0.99,
                        help="clip the factors at this quantile of their values, (0-1], default 0.99")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="the text encoders are extracted only when a weight differs by more than this "
                             "(default 0.01)")
    parser.add_argument("--no_metadata", action="store_true",
                        help="do not save sai modelspec metadata (the minimum ss_* metadata is saved)")
    parser.add_argument("--load_original_model_to", type=str, default=None,
                        help="accepted for compatibility; models load on the CPU")
    parser.add_argument("--load_tuned_model_to", type=str, default=None,
                        help="accepted for compatibility; models load on the CPU")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        extract(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
