"""Generate images from an SD 1.x / 2.x checkpoint or diffusers folder, with LoRAs merged into the weights first.

    python sd_minimal_inference.py --ckpt_path v1-5-pruned.safetensors --prompt "a photo of a cat" \
        --lora_weights "my_lora.safetensors;0.8" --output_dir out --seed 1
    python sd_minimal_inference.py --v2 --v_parameterization --ckpt_path v2-1_768-ema-pruned.safetensors ...

Upstream's SD 1.x / 2.x generator is `gen_img.py`, a large script; this is `sdxl_minimal_inference.py`'s
counterpart for SD 1.x / 2.x instead: the same flags (without SDXL's second prompt and size/crop conditioning;
and without --interactive) plus upstream's `--v2`, `--v_parameterization` and `--clip_skip`, the same samplers
(`--sampler`, library/samplers.py), the same PNG names. `SdPipeline` is `SdxlPipeline` with SD's models and
conditioning (one text encoder, `unet(x, t, context)`, VAE scale 0.18215); the trainer samples with it too. Prompts
are encoded as training encodes captions (library/sd_text_encoding.py, with the trainer's --clip_skip).
"""

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md
from library import console  # noqa: E402
console.quiet_third_party_output()  # before mindspore, which reads GLOG_v when it loads

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

from sdxl_minimal_inference import (  # noqa: E402
    DTYPES, LoraWeight, SdxlPipeline, add_sampling_arguments, cast_parameters, check_sampling_args, check_target_size,
    default_dtype_name, graph_mode_flag, random_seed, resolve_dtypes, runnable_dtype, save_image, size_multiple,
    use_synchronous_pynative,
)
from library import model_util  # noqa: E402
from library.original_unet import Downsample2D  # noqa: E402
from library.sd_text_encoding import check_clip_skip, encode_tokens_sd  # noqa: E402
from library.sd_tokenize import SdTokenizeStrategy  # noqa: E402
from networks import lora  # noqa: E402

logger = logging.getLogger(__name__)

VAE_SCALE_FACTOR = 0.18215  # SD 1.x / 2.x latents (SDXL: 0.13025)


class GuidedSdUNet(nn.Cell):
    """Classifier-free guidance in one call: the UNet runs on [x, x] with [negative, positive] conditioning."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, x, timestep, context, guidance_scale):
        noise_pred = self.unet(ops.cat((x, x)).astype(context.dtype), timestep, context).astype(ms.float32)
        uncond, cond = ops.chunk(noise_pred, 2)
        return uncond + guidance_scale * (cond - uncond)


class SdPipeline(SdxlPipeline):
    """SD 1.x (`v2=False`) or SD 2.x (`v2=True`) models, a tokenizer and the (optionally compiled) guided UNet.

    `SdPipeline(ckpt_path, v2, ...)` loads a checkpoint and merges LoRAs in fp32, then casts to `dtype` (with fp16
    the VAE stays fp32, as SDXL's pipeline); `SdPipeline.from_models(...)` wraps loaded models as they are.
    `generate` is SdxlPipeline's (prompt2 and the size conditioning are ignored).
    """

    vae_scale_factor = VAE_SCALE_FACTOR
    text_encoder_attributes = ("text_encoder",)

    def __init__(self, ckpt_path: str, v2: bool, lora_weights: Sequence[LoraWeight] = (), dtype: str = "fp32",
                 graph_mode: Optional[bool] = None, tokenizer_cache_dir: Optional[str] = None,
                 v_parameterization: bool = False, clip_skip: Optional[int] = None):
        dtype = runnable_dtype(dtype)
        for weight in lora_weights:
            if not os.path.isfile(weight.path):
                raise FileNotFoundError(f"--lora_weights: LoRA file not found: {weight.path}")
        tokenizer = SdTokenizeStrategy(v2, None, tokenizer_cache_dir)

        text_encoder, vae, unet = model_util.load_sd_models(ckpt_path, v2, "--ckpt_path")
        check_clip_skip(text_encoder, clip_skip)
        for weight in lora_weights:
            merger, weights_sd = lora.create_network_from_weights(
                weight.multiplier, weight.path, vae, [text_encoder], unet, for_inference=True
            )
            merger.merge_to(weights_sd)
            logger.info(f"merged LoRA {weight.path} with multiplier {weight.multiplier}")

        vae_dtype = ms.float32 if dtype == "fp16" else DTYPES[dtype]
        for model in (text_encoder, unet):
            cast_parameters(model, DTYPES[dtype])
        cast_parameters(vae, vae_dtype)
        for model in (text_encoder, vae, unet):
            model.set_train(False)
        self._attach_sd(text_encoder, vae, unet, tokenizer, DTYPES[dtype], vae_dtype, graph_mode, v_parameterization,
                        clip_skip)
        self._limit_eager_attention()

    @classmethod
    def from_models(cls, text_encoder, vae, unet, tokenizer: SdTokenizeStrategy, dtype=ms.float32, vae_dtype=None,
                    graph_mode: bool = True, v_parameterization: bool = False,
                    clip_skip: Optional[int] = None) -> "SdPipeline":
        """A pipeline over already-loaded models, used as they are (see SdxlPipeline.from_models)."""
        dtype, vae_dtype = resolve_dtypes(dtype, vae_dtype)
        pipeline = cls.__new__(cls)
        pipeline._attach_sd(text_encoder, vae, unet, tokenizer, dtype, vae_dtype, graph_mode, v_parameterization,
                            clip_skip)
        return pipeline

    def _attach_sd(self, text_encoder, vae, unet, tokenizer, dtype, vae_dtype, graph_mode: Optional[bool],
                   v_parameterization: bool, clip_skip: Optional[int]):
        self.tokenizer = tokenizer
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.text_encoder, self.vae, self.unet = text_encoder, vae, unet
        self.size_multiple = size_multiple(unet, Downsample2D)
        self.v_parameterization = v_parameterization
        self.clip_skip = clip_skip
        self.guided_unet = self._guided(GuidedSdUNet(unet), graph_mode)

    @property
    def models(self):
        return self.text_encoder, self.vae, self.unet

    def encode_prompt(self, prompt: str) -> ms.Tensor:
        """(1, L, C) conditioning, as training encodes captions."""
        ids = ms.Tensor(self.tokenizer.tokenize(prompt)[None])
        return encode_tokens_sd(self.text_encoder, ids, self.clip_skip, self.dtype)

    def conditioning(self, prompt, prompt2, negative_prompt, original_size, crop_top_left, target_size):
        """(context,) for the batch [negative, positive]; SD has no second prompt and no size conditioning."""
        return (ops.cat((self.encode_prompt(negative_prompt), self.encode_prompt(prompt))),)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SD 1.x / 2.x text-to-image with LoRAs merged (Euler or another sampler, classifier-free guidance)")
    parser.add_argument("--ckpt_path", type=str, required=True, help="single-file SD 1.x / 2.x checkpoint (.safetensors) or diffusers model folder")
    parser.add_argument("--v2", action="store_true", help="the checkpoint is SD 2.x")
    parser.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768-v)")
    parser.add_argument("--clip_skip", type=int, default=None,
                        help="use the output of the N-th layer from the end of the text encoder, as in training")
    parser.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt")
    parser.add_argument("--negative_prompt", type=str, default="", help="negative prompt")
    parser.add_argument("--output_dir", type=str, default=".", help="where the PNG files go")
    parser.add_argument("--lora_weights", type=str, nargs="*", default=[],
                        help="LoRA files to merge, each 'path' or 'path;multiplier' (default multiplier 1.0)")
    parser.add_argument("--target_height", type=int, default=None,
                        help="image height, a multiple of 64 (default 512; 768 with --v2 --v_parameterization)")
    parser.add_argument("--target_width", type=int, default=None,
                        help="image width, a multiple of 64 (default 512; 768 with --v2 --v_parameterization)")
    add_sampling_arguments(parser)
    console.add_logging_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None):
    parser = setup_parser()
    args = parser.parse_args(argv)
    console.setup_logging(args)
    use_synchronous_pynative()

    default_size = 768 if args.v2 and args.v_parameterization else 512  # upstream's resolutions of these models
    target_size = (args.target_height or default_size, args.target_width or default_size)
    try:
        check_target_size(*target_size)
        lora_weights = check_sampling_args(args)
        pipeline = SdPipeline(args.ckpt_path, args.v2, lora_weights, args.dtype or default_dtype_name(),
                              graph_mode_flag(args.mode), args.tokenizer_cache_dir, args.v_parameterization, args.clip_skip)
        check_target_size(*target_size, pipeline.size_multiple)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")

    seed = random_seed() if args.seed is None else args.seed
    logger.info(f"prompt: {args.prompt!r}, negative: {args.negative_prompt!r}, seed: {seed}, sampler: {args.sampler}")
    image = pipeline.generate(prompt=args.prompt, negative_prompt=args.negative_prompt, target_size=target_size,
                              guidance_scale=args.guidance_scale, steps=args.steps, seed=seed, sampler=args.sampler,
                              release_models=True)
    logger.info(f"saved {save_image(image, args.output_dir)}")


if __name__ == "__main__":
    main(sys.argv[1:])
