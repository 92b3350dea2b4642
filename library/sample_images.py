"""Sample images during training, as upstream's `sample_images_common` / `sample_image_inference` write them.

The trainer builds one `SdxlPipeline.from_models(...)` over its models (the LoRA network applied in place, used as
it is, never merged) and calls `sample_images` when `should_sample` says so. One PNG per prompt goes to

    <output_dir>/sample/[<output_name>_]<e{epoch:06d} | {step:06d}>_<index:02d>_<YYYYmmddHHMMSS>[_<seed>].png

upstream's name (the seed suffix only for a prompt that sets `--d`), with the generation settings in PNG text
chunks. Upstream's LPW prompt weighting (`(word:1.2)`) is not applied: prompts are encoded as training encodes
captions, by the trainer's tokenizer.

Nothing random outside this module changes: each image's noise comes from a numpy Generator seeded with the image
seed (a prompt without one gets a seed drawn from a fresh, OS-seeded Generator), and the global states of
`random` and `np.random` are saved and put back around the whole call in case a compile draws from them.
MindSpore's global seed is never set. The train/eval flags of every cell of the pipeline's models are put back.
"""

import contextlib
import logging
import os
import random
import time
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.graph_reuse import eval_mode
from library.sample_prompts import SamplePrompt
from library.samplers import DEFAULT_TRAINING_SAMPLER, check_sampler

logger = logging.getLogger(__name__)

SAMPLE_DIR = "sample"
SEED_RANGE = 2 ** 32  # seeds drawn for prompts without one


class SampleImage(NamedTuple):
    path: str
    image: np.ndarray  # (H, W, 3) uint8, e.g. for SummaryWriter.add_image(tag, image, step, dataformats="HWC")
    prompt: SamplePrompt
    seed: int  # the seed used (drawn when the prompt has none)
    sampler: str


def should_sample(step: int, epoch: Optional[int], *, sample_at_first: bool, every_n_steps: Optional[int],
                  every_n_epochs: Optional[int]) -> bool:
    """Upstream's schedule. Call with epoch=None after an optimizer step, with the finished epoch's number (1-based)
    at an epoch's end, and with step=0 (epoch 0) before training. Every-N-epochs wins over every-N-steps, which
    then never samples at an epoch's end; N <= 0 disables either (upstream sets it to None)."""
    every_n_steps = every_n_steps if every_n_steps and every_n_steps > 0 else None
    every_n_epochs = every_n_epochs if every_n_epochs and every_n_epochs > 0 else None
    if step == 0:
        return bool(sample_at_first)
    if every_n_epochs is not None:
        return epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps is not None:
        return epoch is None and step % every_n_steps == 0
    return False


def sample_image_name(output_name: Optional[str], step: int, epoch: Optional[int], index: int,
                      seed: Optional[int], timestamp: Optional[str] = None) -> str:
    """Upstream's file name; `seed` is the prompt's own (None: no suffix); `timestamp` defaults to now."""
    prefix = "" if output_name is None else output_name + "_"
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    timestamp = timestamp or time.strftime("%Y%m%d%H%M%S", time.localtime())
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{timestamp}{suffix}.png"


@contextlib.contextmanager
def preserved_global_random_state() -> Iterator[None]:
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def png_info(prompt: SamplePrompt, seed: int, sampler: str, step: int, epoch: Optional[int]) -> PngInfo:
    info = PngInfo()
    fields = dict(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt, seed=seed, steps=prompt.steps,
                  scale=prompt.scale, sampler=sampler, width=prompt.width, height=prompt.height, training_step=step)
    if epoch is not None:
        fields["epoch"] = epoch
    for key, value in fields.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, any prompt text
    return info


def save_png(image: np.ndarray, path: str, info: PngInfo):
    """Written under a temporary name, then renamed: an interrupted write leaves no truncated PNG behind."""
    tmp_path = path + ".tmp"
    Image.fromarray(image).save(tmp_path, format="PNG", pnginfo=info)
    os.replace(tmp_path, path)


def sample_images(pipeline, prompts: Sequence[SamplePrompt], output_dir: str, *, step: int,
                  epoch: Optional[int] = None, output_name: Optional[str] = None,
                  default_sampler: str = DEFAULT_TRAINING_SAMPLER, progress: bool = False) -> List[SampleImage]:
    """Generate and save one image per prompt with `pipeline` (an `SdxlPipeline`, or anything with its
    `generate(...)`, `size_multiple` and `models`); returns what was written, in prompt order.

    `step` is the global step and `epoch` the epoch number for an epoch-end sample (None otherwise): they name
    the files as upstream. A prompt without `--ss` uses `default_sampler` (--sample_sampler). As upstream's
    pipeline, a CFG scale of at most 1 samples the positive prompt alone (classifier-free guidance off).
    """
    check_sampler(default_sampler, what="--sample_sampler")
    for p in prompts:  # before the first image: a bad prompt does not cost the others' time
        check_sampler(p.sampler or default_sampler, p.steps, what=f"{p.source or 'prompt'}: sampler")
        if p.width % pipeline.size_multiple or p.height % pipeline.size_multiple:
            raise ValueError(f"{p.source or 'prompt'}: {p.width}x{p.height} (WxH): both sides must be multiples of "
                             f"{pipeline.size_multiple} for this model")
    save_dir = os.path.join(output_dir, SAMPLE_DIR)
    os.makedirs(save_dir, exist_ok=True)
    logger.info("generating %d sample image(s) at step %d%s", len(prompts), step,
                "" if epoch is None else f" (epoch {epoch})")
    results = []
    with preserved_global_random_state(), eval_mode(pipeline.models):
        seed_source = np.random.default_rng()  # OS entropy: draws for prompts without a seed, nothing global
        for p in prompts:
            seed = p.seed if p.seed is not None else int(seed_source.integers(SEED_RANGE))
            sampler = p.sampler or default_sampler
            logger.info("sample %d: prompt %r, negative %r, %dx%d, %d steps, scale %g, sampler %s, seed %d",
                        p.index, p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.scale, sampler, seed)
            image = pipeline.generate(
                prompt=p.prompt, negative_prompt=p.negative_prompt, target_size=(p.height, p.width),
                guidance_scale=p.scale if p.scale > 1.0 else 1.0,  # 1: uncond + 1 * (cond - uncond) = cond
                steps=p.steps, seed=seed, sampler=sampler, progress=progress,
            )
            path = os.path.join(save_dir, sample_image_name(output_name, step, epoch, p.index, p.seed))
            save_png(image, path, png_info(p, seed, sampler, step, epoch))
            results.append(SampleImage(path, image, p, seed, sampler))
    logger.info("saved %d sample image(s) to %s", len(results), save_dir)
    return results
