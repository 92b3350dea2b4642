"""Generate images from a single-file SDXL checkpoint, with LoRAs merged into the weights first.

    python sdxl_minimal_inference.py --ckpt_path sdxl.safetensors --prompt "a photo of a cat" \
        --lora_weights "my_lora.safetensors;0.8" --output_dir out --seed 1

Kohya's `sdxl_minimal_inference.py` with the same flags: Euler discrete sampling (diffusers' scheduler, 1000-step
scaled-linear schedule) with classifier-free guidance on the batch [negative, positive], SDXL size conditioning,
VAE decoding, and `image_<YYYYmmdd-HHMMSS>_<NNN>.png` files. `--sampler` picks any of the trainer's
`--sample_sampler` samplers instead (library/samplers.py); the default, euler, is upstream's.

Three upstream defects are fixed: `--prompt2` goes to text encoder 2, text encoder 2 gets its own tokenizer's ids,
and both prompts are encoded exactly as training encodes captions (`library.sdxl_text_encoding`), so a LoRA sees
at inference the conditioning it was trained on.

Everything the run needs is checked before the checkpoint is loaded or a step is sampled: a bad argument leaves
no file behind.
"""

import argparse
import logging
import math
import os
import secrets
import sys
import time
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md
from library import console  # noqa: E402
console.quiet_third_party_output()  # before mindspore, which reads GLOG_v when it loads

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn, ops  # noqa: E402
from PIL import Image  # noqa: E402

from library import graph_reuse, host_memory, layers, samplers, sdxl_model_util, sdxl_train_util  # noqa: E402
from library.sdxl_original_unet import Downsample2D  # noqa: E402
from library.sdxl_text_encoding import encode_tokens_sdxl  # noqa: E402
from library.sdxl_tokenize import SdxlTokenizeStrategy  # noqa: E402
from networks import lora, lora_io  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
VAE_DOWNSCALE = 8  # pixels per latent pixel
LATENT_CHANNELS = 4
# On CPU a compiled UNet keeps every kernel's buffers for the graph's life (MindSpore 2.10: a 3x3 conv holds ~9x its
# input), eager kernels free theirs as they go: at SDXL size and 1024 px the compiled guided UNet needed over 9 GB
# more (measured). A full-size step runs for minutes, so the per-kernel overhead a compile saves is negligible.
LARGEST_COMPILED_UNET_ON_CPU = 1_000_000_000  # parameters; SDXL's UNet has 2.6 B, SD 1.x/2.x's 0.87 B


class LoraWeight(NamedTuple):
    path: str
    multiplier: float


# ------------------------------------------------------------------------------------------------ argument checks

def parse_lora_weight(spec: str) -> LoraWeight:
    """`path` or `path;multiplier` (multiplier 1.0 when absent); a `;` inside the path is kept."""
    path, separator, multiplier = spec.rpartition(";")
    if not separator:
        path, multiplier = spec, "1.0"
    try:
        value = float(multiplier)
    except ValueError:
        value = math.nan
    if not path or not math.isfinite(value):
        raise ValueError(f"--lora_weights '{spec}': expected 'path' or 'path;multiplier' with a number as multiplier")
    return LoraWeight(path, value)


def check_target_size(height: int, width: int, multiple: int = VAE_DOWNSCALE):
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"target size {height}x{width} (HxW): both sides must be positive multiples of {multiple}")


def default_dtype_name() -> str:
    # upstream generates in fp16; MindSpore's CPU kernels are ~10x slower in fp16 than in fp32
    return "fp32" if ms.get_context("device_target") == "CPU" else "fp16"


def runnable_dtype(name: str) -> str:
    """The dtype that runs for `name` on this backend: bf16 on CPU becomes fp32, with a warning."""
    if name == "bf16" and ms.get_context("device_target") == "CPU":
        logger.warning("--dtype bf16: MindSpore has no bf16 matmul kernel on CPU; computing in fp32 instead")
        return "fp32"
    if name == "fp16" and ms.get_context("device_target") == "CPU":
        logger.warning("--dtype fp16 on CPU works but runs about 10x slower than fp32")
    return name


def default_graph_mode(unet: nn.Cell) -> bool:
    """`--mode`'s default: compile the guided UNet, except on CPU for a UNet larger than
    LARGEST_COMPILED_UNET_ON_CPU parameters (SDXL), whose compiled graph costs gigabytes and saves no time."""
    if ms.get_context("device_target") != "CPU":
        return True
    return sum(param.size for param in unet.get_parameters()) <= LARGEST_COMPILED_UNET_ON_CPU


def use_synchronous_pynative():
    """Eager mode for everything but the compiled UNet; on CPU, asynchronous PyNative is ~10x slower."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if ms.get_context("device_target") == "CPU":
        ms.set_context(pynative_synchronize=True)


# ------------------------------------------------------------------------------------------------ sampling

class GuidedUNet(nn.Cell):
    """Classifier-free guidance in one call: the UNet runs on [x, x] with [negative, positive] conditioning."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, x, timestep, context, y, guidance_scale):
        noise_pred = self.unet(ops.cat((x, x)).astype(context.dtype), timestep, context, y).astype(ms.float32)
        uncond, cond = ops.chunk(noise_pred, 2)
        return uncond + guidance_scale * (cond - uncond)


# ------------------------------------------------------------------------------------------------ models

def cast_parameters(cell: nn.Cell, dtype):
    for param in cell.get_parameters():
        if param.dtype != dtype:
            param.set_dtype(dtype)


def size_multiple(unet, downsample_class=Downsample2D) -> int:
    """Pixel sizes must be multiples of this: the VAE's factor 8 times 2 per UNet downsampling."""
    downsamplings = sum(isinstance(cell, downsample_class) for _, cell in unet.cells_and_names())
    return VAE_DOWNSCALE * 2 ** downsamplings


def resolve_dtypes(dtype, vae_dtype=None):
    """(dtype, vae_dtype) as mindspore dtypes from ms dtypes or "fp32"/"fp16"/"bf16"; the VAE's defaults to `dtype`."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    vae_dtype = dtype if vae_dtype is None else DTYPES[vae_dtype] if isinstance(vae_dtype, str) else vae_dtype
    return dtype, vae_dtype


class SdxlPipeline:
    """The models, a tokenizer, and the (optionally compiled) guided UNet.

    `SdxlPipeline(ckpt_path, ...)` loads a checkpoint and merges LoRAs: the weights are loaded in fp32 so LoRA
    deltas are added at full precision, then cast to `dtype`; with fp16 the VAE stays fp32, as upstream (SDXL's
    VAE overflows in fp16); `graph_mode=None` picks `default_graph_mode(unet)`, and attention runs in chunks where
    a model runs eagerly. `SdxlPipeline.from_models(...)` wraps models that are already loaded (the trainer's, with
    its LoRA network applied in place) and uses them exactly as they are. `generate` is family-neutral:
    `conditioning(...)` returns the guided UNet's conditioning inputs (SDXL: context and y; SD 1.x/2.x's
    `sd_minimal_inference.SdPipeline` returns the context alone).
    """

    vae_scale_factor = sdxl_model_util.VAE_SCALE_FACTOR
    text_encoder_attributes = ("text_encoder1", "text_encoder2")
    released = False  # set by generate(release_models=True)

    def __init__(self, ckpt_path: str, lora_weights: Sequence[LoraWeight] = (), dtype: str = "fp32",
                 graph_mode: Optional[bool] = None, tokenizer_cache_dir: Optional[str] = None):
        dtype = runnable_dtype(dtype)
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--ckpt_path: checkpoint not found: {ckpt_path}")
        for weight in lora_weights:
            if not os.path.isfile(weight.path):
                raise FileNotFoundError(f"--lora_weights: LoRA file not found: {weight.path}")
            lora_io.check_sdxl_lora_file(weight.path)  # before the checkpoint loads: a wrong file costs no minutes
        tokenizer = SdxlTokenizeStrategy(None, tokenizer_cache_dir)

        te1, te2, vae, unet, _, _ = sdxl_train_util.load_sdxl_models(ckpt_path, "--ckpt_path")
        for weight in lora_weights:
            merger, weights_sd = lora.create_network_from_weights(
                weight.multiplier, weight.path, vae, [te1, te2], unet, for_inference=True
            )
            merger.merge_to(weights_sd)
            logger.info(f"merged LoRA {weight.path} with multiplier {weight.multiplier}")

        vae_dtype = ms.float32 if dtype == "fp16" else DTYPES[dtype]
        for model in (te1, te2, unet):
            cast_parameters(model, DTYPES[dtype])
        cast_parameters(vae, vae_dtype)
        for model in (te1, te2, vae, unet):
            model.set_train(False)
        self._attach(te1, te2, vae, unet, tokenizer, DTYPES[dtype], vae_dtype, graph_mode, v_parameterization=False)
        self._limit_eager_attention()

    @classmethod
    def from_models(cls, text_encoder1, text_encoder2, vae, unet, tokenizer: SdxlTokenizeStrategy,
                    dtype=ms.float32, vae_dtype=None, graph_mode: bool = True,
                    v_parameterization: bool = False) -> "SdxlPipeline":
        """A pipeline over already-loaded models, used as they are: no cast, no LoRA merge, no train/eval switch
        (`library.sample_images.sample_images` switches to eval mode and back). `dtype` is the dtype the text
        encoders and UNet compute in (an ms dtype or "fp32"/"fp16"/"bf16"), `vae_dtype` the VAE's (default:
        `dtype`); `tokenizer` tokenizes as in training (e.g. the trainer's, with its --max_token_length)."""
        dtype, vae_dtype = resolve_dtypes(dtype, vae_dtype)
        pipeline = cls.__new__(cls)
        pipeline._attach(text_encoder1, text_encoder2, vae, unet, tokenizer, dtype, vae_dtype, graph_mode,
                         v_parameterization)
        return pipeline

    def _attach(self, te1, te2, vae, unet, tokenizer, dtype, vae_dtype, graph_mode: Optional[bool],
                v_parameterization: bool):
        self.tokenizer = tokenizer
        self.dtype, self.vae_dtype = dtype, vae_dtype
        self.text_encoder1, self.text_encoder2, self.vae, self.unet = te1, te2, vae, unet
        self.size_multiple = size_multiple(unet)
        self.v_parameterization = v_parameterization
        self.guided_unet = self._guided(GuidedUNet(unet), graph_mode)

    def _guided(self, guided_unet: nn.Cell, graph_mode: Optional[bool]):
        self.graph_mode = default_graph_mode(self.unet) if graph_mode is None else graph_mode
        # compiled on the first call, then several times faster per step; dynamic=1: a second image size compiles
        # one dynamic-shape graph that serves every later size, instead of a graph per size
        return ms.jit(guided_unet.construct, dynamic=1) if self.graph_mode else guided_unet

    def _limit_eager_attention(self):
        """Attention in chunks where the models run eagerly: the VAE always, the UNet unless it is compiled. Only
        for models this pipeline loaded: the trainer's models also run in its compiled step."""
        for model in (self.vae,) if self.graph_mode else (self.vae, self.unet):
            layers.limit_eager_attention_scores(model)

    def _release(self, *attributes: str):
        """Drop the pipeline's references to these models and free their memory."""
        for name in attributes:
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__} has no model {name!r} to release")
            setattr(self, name, None)
        host_memory.free_unreferenced_memory()

    @property
    def models(self) -> Tuple[nn.Cell, nn.Cell, nn.Cell, nn.Cell]:
        return self.text_encoder1, self.text_encoder2, self.vae, self.unet

    def encode_prompt(self, prompt: str, prompt2: str) -> Tuple[ms.Tensor, ms.Tensor]:
        """(context (1, L, C1 + C2), pool2 (1, P)), L = 77 (or n * 75 + 2 for a tokenizer of n windows): TE1 reads
        `prompt`, TE2 reads `prompt2`, as in training."""
        ids1, _ = self.tokenizer.tokenize(prompt)
        _, ids2 = self.tokenizer.tokenize(prompt2)
        hidden1, hidden2, pool2 = encode_tokens_sdxl(
            self.text_encoder1, self.text_encoder2, ms.Tensor(ids1[None]), ms.Tensor(ids2[None])
        )
        return ops.cat((hidden1, hidden2), axis=2), pool2

    def conditioning(self, prompt, prompt2, negative_prompt, original_size, crop_top_left, target_size):
        """(context, y) for the batch [negative, positive]; both share the size conditioning."""
        context, pool2 = self.encode_prompt(prompt, prompt2)
        uncond_context, uncond_pool2 = self.encode_prompt(negative_prompt, negative_prompt)
        sizes = [ms.Tensor([list(size)], ms.float32) for size in (original_size, crop_top_left, target_size)]
        size_embeddings = sdxl_train_util.get_size_embeddings(*sizes).astype(self.dtype)
        y = ops.cat((ops.cat((uncond_pool2, size_embeddings), axis=1), ops.cat((pool2, size_embeddings), axis=1)))
        return ops.cat((uncond_context, context)), y

    def generate(self, prompt: str = "A photo of a cat", prompt2: Optional[str] = None, negative_prompt: str = "",
                 target_size: Tuple[int, int] = (1024, 1024), original_size: Optional[Tuple[int, int]] = None,
                 crop_top_left: Tuple[int, int] = (0, 0), guidance_scale: float = 7.0, steps: int = 50,
                 seed: int = 0, progress: bool = True, sampler: str = samplers.DEFAULT_INFERENCE_SAMPLER,
                 release_models: bool = False) -> np.ndarray:
        """One image as a (H, W, 3) uint8 array; sizes are (height, width) / (top, left) in pixels.

        `seed` seeds one numpy Generator, local to this call: it draws the initial noise, then the noise of an
        ancestral sampler. No global random state is read or changed. `release_models=True` (the last image of a
        pipeline) frees the text encoders once the prompts are encoded and the UNet once the latents are sampled,
        so the peak memory is the larger of the three phases' instead of all models plus the largest phase."""
        if self.released:
            raise RuntimeError("this pipeline released its models after its last image (release_models=True)")
        height, width = target_size
        check_target_size(height, width, self.size_multiple)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        samplers.check_sampler(sampler, steps)
        conds = self.conditioning(prompt, prompt if prompt2 is None else prompt2, negative_prompt,
                                  original_size or target_size, crop_top_left, target_size)
        self.released = release_models
        if release_models:
            self._release(*self.text_encoder_attributes)

        shape = (1, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(shape, dtype=np.float32)
        guidance = ms.Tensor(guidance_scale, ms.float32)
        # the jitted function is no GraphEntry: a compile for a new size must not reuse blocks parsed for another
        graph_reuse.new_graph_generation()
        latents = samplers.sample_latents(sampler, lambda x, t: self.guided_unet(x, t, *conds, guidance), noise,
                                          steps, rng, progress, self.v_parameterization)
        if release_models:
            self._release("unet", "guided_unet")

        image = self.vae.decode((latents / self.vae_scale_factor).astype(self.vae_dtype))
        image = (image.astype(ms.float32).asnumpy()[0] / 2 + 0.5).clip(0, 1)
        return (image.transpose(1, 2, 0) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ output

def save_image(image: np.ndarray, output_dir: str) -> str:
    """Write `image_<YYYYmmdd-HHMMSS>_<NNN>.png`, NNN being the first index not yet taken in that second."""
    os.makedirs(output_dir, exist_ok=True)
    timestamp = time.strftime("%Y%m%d-%H%M%S")
    index = 0
    while os.path.exists(path := os.path.join(output_dir, f"image_{timestamp}_{index:03d}.png")):
        index += 1
    # a temp name first, so an interrupted write never leaves a truncated PNG under the final name
    tmp_path = path + ".tmp"
    Image.fromarray(image).save(tmp_path, format="PNG")
    os.replace(tmp_path, path)
    return path


# ------------------------------------------------------------------------------------------------ command line

def add_sampling_arguments(parser: argparse.ArgumentParser):
    """The flags every minimal inference script shares: guidance, steps, sampler, seed, dtype, mode."""
    parser.add_argument("--guidance_scale", type=float, default=7.0, help="classifier-free guidance scale")
    parser.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    parser.add_argument("--sampler", type=str, choices=samplers.SAMPLER_NAMES,
                        default=samplers.DEFAULT_INFERENCE_SAMPLER,
                        help="sampler (scheduler), the choices of the trainer's --sample_sampler (default: euler, "
                             "upstream's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the initial noise (default: random)")
    parser.add_argument("--tokenizer_cache_dir", type=str, default=None,
                        help="folder to save the tokenizers to / load them from")
    parser.add_argument("--dtype", type=str, choices=sorted(DTYPES), default=None,
                        help="weights and activations (default: fp16 on GPU/Ascend as upstream, fp32 on CPU); "
                             "with fp16 the VAE runs in fp32")
    parser.add_argument("--mode", type=str, choices=["graph", "pynative"], default=None,
                        help="run the UNet as a compiled graph (at most two compiles: first size, then one dynamic "
                             "graph) or eagerly (default: graph, but pynative on CPU for SDXL-size UNets, whose "
                             "compiled graph needs gigabytes more memory and is no faster there)")


def check_sampling_args(args) -> List[LoraWeight]:
    """The shared flags' checks (before any model loads); returns the parsed --lora_weights."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    samplers.check_sampler(args.sampler, args.steps, what="--sampler")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    return [parse_lora_weight(spec) for spec in args.lora_weights]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SDXL text-to-image with LoRAs merged (Euler or another sampler, classifier-free guidance)")
    parser.add_argument("--ckpt_path", type=str, required=True,
                        help="single-file SDXL checkpoint (.safetensors) or diffusers model folder")
    parser.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt for text encoder 1 (and 2)")
    parser.add_argument("--prompt2", type=str, default=None, help="prompt for text encoder 2 (default: --prompt)")
    parser.add_argument("--negative_prompt", type=str, default="", help="negative prompt (both text encoders)")
    parser.add_argument("--output_dir", type=str, default=".", help="where the PNG files go")
    parser.add_argument("--lora_weights", type=str, nargs="*", default=[],
                        help="LoRA files to merge, each 'path' or 'path;multiplier' (default multiplier 1.0)")
    parser.add_argument("--target_height", type=int, default=1024,
                        help="image height; a multiple of 32 for SDXL (VAE x8, UNet x4)")
    parser.add_argument("--target_width", type=int, default=1024,
                        help="image width; a multiple of 32 for SDXL (VAE x8, UNet x4)")
    parser.add_argument("--original_height", type=int, default=None, help="size conditioning (default: target)")
    parser.add_argument("--original_width", type=int, default=None, help="size conditioning (default: target)")
    parser.add_argument("--crop_top", type=int, default=0, help="crop conditioning, top")
    parser.add_argument("--crop_left", type=int, default=0, help="crop conditioning, left")
    add_sampling_arguments(parser)
    parser.add_argument("--interactive", action="store_true",
                        help="after loading, read prompt / prompt2 / negative prompt / seed from stdin in a loop "
                             "(instead of --prompt/--prompt2/--negative_prompt/--seed)")
    console.add_logging_arguments(parser)
    return parser


def graph_mode_flag(mode: Optional[str]) -> Optional[bool]:
    """--mode as the pipelines' graph_mode: True, False, or None for the default."""
    return None if mode is None else mode == "graph"


def random_seed() -> int:
    return secrets.randbelow(2 ** 32)


def interactive_requests(settings: dict) -> Iterator[dict]:
    """Requests read from stdin until an empty prompt or end of input; sizes, steps and guidance stay fixed."""
    while True:
        try:
            prompt = input("prompt (empty to quit): ").strip()
            if not prompt:
                return
            prompt2 = input("prompt2 (empty: same as prompt): ").strip() or prompt
            negative_prompt = input("negative prompt: ").strip()
            seed = input("seed (empty: random): ").strip()
        except EOFError:
            return
        if seed and not seed.isdigit():
            logger.warning(f"seed {seed!r} is not a non-negative integer; using a random one")
        yield dict(settings, prompt=prompt, prompt2=prompt2, negative_prompt=negative_prompt,
                   seed=int(seed) if seed.isdigit() else random_seed())


def main(argv: Optional[List[str]] = None):
    parser = setup_parser()
    args = parser.parse_args(argv)
    console.setup_logging(args)
    use_synchronous_pynative()

    dtype = args.dtype or default_dtype_name()
    try:
        check_target_size(args.target_height, args.target_width)
        lora_weights = check_sampling_args(args)
        pipeline = SdxlPipeline(args.ckpt_path, lora_weights, dtype, graph_mode_flag(args.mode),
                                args.tokenizer_cache_dir)
        check_target_size(args.target_height, args.target_width, pipeline.size_multiple)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")

    target_size = (args.target_height, args.target_width)
    settings = dict(
        target_size=target_size,
        original_size=(args.original_height or target_size[0], args.original_width or target_size[1]),
        crop_top_left=(args.crop_top, args.crop_left),
        guidance_scale=args.guidance_scale,
        steps=args.steps,
        sampler=args.sampler,
    )
    if args.interactive:
        requests = interactive_requests(settings)
    else:
        seed = random_seed() if args.seed is None else args.seed
        # one image: each model is freed once its part is done
        requests = [dict(settings, prompt=args.prompt, prompt2=args.prompt2, negative_prompt=args.negative_prompt,
                         seed=seed, release_models=True)]
    for request in requests:
        logger.info(f"prompt: {request['prompt']!r}, prompt2: {request['prompt2']!r}, "
                    f"negative: {request['negative_prompt']!r}, seed: {request['seed']}, sampler: {args.sampler}, "
                    f"mode: {'graph' if pipeline.graph_mode else 'pynative'}")
        path = save_image(pipeline.generate(**request), args.output_dir)
        logger.info(f"saved {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
