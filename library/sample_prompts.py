"""Prompt files for sample images (`--sample_prompts`), in upstream's three forms, checked before training starts.

- `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped. Options follow the prompt,
  each introduced by ` --` (a space, two dashes), letters in any case, in any order; the last of a repeated
  option wins:
  `--n` negative prompt (the rest up to the next option), `--w` width, `--h` height, `--d` seed, `--s` steps,
  `--l` CFG scale, `--ss` sampler (one of `--sample_sampler`'s names).
- `.json`: a list whose items are such lines (strings) or objects with upstream's keys: `prompt`,
  `negative_prompt`, `width`, `height`, `seed`, `sample_steps`, `scale`, `sample_sampler`.
- `.toml`: a `[prompt]` table whose keys are defaults for every `[[prompt.subset]]` entry, each entry one prompt
  with the same keys as the JSON objects (an entry's key overrides the default; upstream fails on that instead).

Defaults as upstream's `sample_image_inference`: 512x512, 30 steps, scale 7.5, no negative prompt, a random seed,
the sampler of `--sample_sampler`. As upstream, steps are clamped to 1..1000 and width and height are rounded down
to a multiple of 8, at least 64; SDXL's UNet needs a multiple of 32 (VAE x8, two halvings), which upstream only
finds out when the sample crashes mid-training, so a size that is not one fails here, when the file is read.

Upstream ignores what it cannot parse (`--w 7x7`, an unknown `--x`, a JSON key it does not know); here every such
line fails with a ValueError that names the file, the line or entry and what was expected. Upstream's options for
other model families (`--g` FLUX guidance, `--cn` ControlNet image, `--ctr`, `--rcfg`, `--fs`) are refused too:
SDXL sampling would silently ignore them (or, for `--cn`, crash).
"""

import json
import math
import os
import tomllib
from dataclasses import dataclass
from typing import List, Optional

from library.samplers import DEFAULT_TRAINING_SAMPLER, check_sampler

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MIN_SIZE = 64
SIZE_ROUNDING = 8  # upstream rounds sizes down to this
SDXL_SIZE_MULTIPLE = 32  # what the SDXL UNet accepts
MAX_STEPS = 1000

# upstream's option letters -> its prompt-dict keys (the JSON / TOML keys)
OPTION_KEYS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "sample_steps", "l": "scale",
               "ss": "sample_sampler"}
# understood by upstream's parser, but for other model families
FOREIGN_OPTIONS = {
    "g": ("guidance_scale", "the embedded guidance scale of FLUX.1"),
    "cn": ("controlnet_image", "a ControlNet image (upstream's SDXL sampling has no ControlNet)"),
    "ctr": ("cfg_trunc_ratio", "the CFG truncation ratio of Lumina"),
    "rcfg": ("renorm_cfg", "the CFG renormalization of Lumina"),
    "fs": ("flow_shift", "the flow shift of flow-matching models"),
}
FOREIGN_KEYS = {key: (letter, what) for letter, (key, what) in FOREIGN_OPTIONS.items()}
KNOWN_KEYS = ("prompt",) + tuple(OPTION_KEYS.values())


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to generate; `index` is its position among the file's prompts (the file name's NN)."""

    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    seed: Optional[int] = None  # None: a new random seed for every image
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    sampler: Optional[str] = None  # None: --sample_sampler
    index: int = 0
    source: str = ""  # "<file>: line 3", for messages


# ------------------------------------------------------------------------------------------------ values

def _integer(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what}: expected an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():  # digits only, as upstream's \d+
            raise ValueError(f"{what}: expected a non-negative integer, got {value!r}")
        value = int(text)
    if value < minimum:
        raise ValueError(f"{what}: expected an integer of at least {minimum}, got {value}")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what}: expected a non-negative number, got {value!r}")
    return number


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {value!r}")
    return value


def _size(value, what: str, size_multiple: int) -> int:
    size = _integer(value, what, minimum=1)
    size = max(MIN_SIZE, size - size % SIZE_ROUNDING)
    if size % size_multiple:
        rounded = f" (rounded down to {size})" if size != int(value) else ""
        below = size - size % size_multiple
        suggestion = f"{below} or {below + size_multiple}" if below >= MIN_SIZE else f"{below + size_multiple}"
        raise ValueError(f"{what}: {value}{rounded} is not a multiple of {size_multiple}, which the SDXL UNet needs; "
                         f"try {suggestion}")
    return size


def prompt_from_dict(entry: dict, source: str, index: int = 0, size_multiple: int = SDXL_SIZE_MULTIPLE,
                     labels: Optional[dict] = None) -> SamplePrompt:
    """A SamplePrompt from upstream's prompt-dict keys; ValueError (starting with `source`) for anything else.
    `labels` names the keys in messages (the option letters for a text line; default: the quoted keys)."""
    label = (lambda key: labels[key]) if labels else repr
    for key in entry:
        if key in FOREIGN_KEYS:
            letter, what = FOREIGN_KEYS[key]
            raise ValueError(f"{source}: {key!r} (--{letter}) is {what}; SDXL sample images do not use it")
        if key not in KNOWN_KEYS:
            raise ValueError(f"{source}: unknown key {key!r}; expected {', '.join(KNOWN_KEYS)}")
    try:
        prompt = _text(entry.get("prompt", ""), label("prompt")).strip()
        if not prompt:
            raise ValueError("missing prompt text")
        fields = dict(prompt=prompt, index=index, source=source)
        if entry.get("negative_prompt") is not None:
            fields["negative_prompt"] = _text(entry["negative_prompt"], label("negative_prompt")).strip()
        if "width" in entry:
            fields["width"] = _size(entry["width"], label("width"), size_multiple)
        if "height" in entry:
            fields["height"] = _size(entry["height"], label("height"), size_multiple)
        if entry.get("seed") is not None:
            fields["seed"] = _integer(entry["seed"], label("seed"))
        if "sample_steps" in entry:
            fields["steps"] = min(MAX_STEPS, max(1, _integer(entry["sample_steps"], label("sample_steps"))))
        if "scale" in entry:
            fields["scale"] = _number(entry["scale"], label("scale"))
        if entry.get("sample_sampler") is not None:
            name = _text(entry["sample_sampler"], label("sample_sampler")).strip().lower()
            fields["sampler"] = check_sampler(name, what=f"{label('sample_sampler')}: sampler")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return SamplePrompt(**fields)


LINE_LABELS = {"prompt": "prompt", **{key: "--" + letter for letter, key in OPTION_KEYS.items()}}


def parse_prompt_line(line: str, source: str = "prompt", index: int = 0,
                      size_multiple: int = SDXL_SIZE_MULTIPLE) -> SamplePrompt:
    """One line of upstream's syntax: `prompt text --n negative --w 768 --h 512 --d 1 --l 7.5 --s 28 --ss euler_a`."""
    prompt, *options = line.strip().split(" --")
    if prompt.lstrip().startswith("--"):
        raise ValueError(f"{source}: missing prompt text before the options")
    entry = {"prompt": prompt}
    for option in options:
        letter, _, value = option.partition(" ")
        letter, value = letter.lower(), value.strip()
        if letter in FOREIGN_OPTIONS:
            raise ValueError(f"{source}: --{letter} is {FOREIGN_OPTIONS[letter][1]}; SDXL sample images do not use it")
        if letter not in OPTION_KEYS:
            raise ValueError(f"{source}: unknown option --{letter}; expected "
                             f"{', '.join('--' + o for o in OPTION_KEYS)} (each after ' --')")
        if not value and letter != "n":
            raise ValueError(f"{source}: --{letter} needs a value")
        entry[OPTION_KEYS[letter]] = value
    return prompt_from_dict(entry, source, index, size_multiple, LINE_LABELS)


# ------------------------------------------------------------------------------------------------ files

def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM from a Windows editor is not part of the prompt
        return f.read()


def _load_txt(path: str, size_multiple: int) -> List[SamplePrompt]:
    prompts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, f"{path}: line {number}", len(prompts), size_multiple))
    return prompts


def _entry(item, source: str, index: int, size_multiple: int) -> SamplePrompt:
    if isinstance(item, str):
        return parse_prompt_line(item, source, index, size_multiple)
    if isinstance(item, dict):
        return prompt_from_dict(item, source, index, size_multiple)
    raise ValueError(f"{source}: expected a prompt string or a table/object of prompt keys, got {item!r}")


def _load_json(path: str, size_multiple: int) -> List[SamplePrompt]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of prompts (strings or objects), got {type(items).__name__}")
    return [_entry(item, f"{path}: entry {i + 1}", i, size_multiple) for i, item in enumerate(items)]


def _load_toml(path: str, size_multiple: int) -> List[SamplePrompt]:
    try:
        data = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise ValueError(f"{path}: expected a [prompt] table (defaults) with [[prompt.subset]] entries (one per image)")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    prompts = []
    for i, subset in enumerate(table["subset"]):
        source = f"{path}: [[prompt.subset]] {i + 1}"
        if not isinstance(subset, dict):
            raise ValueError(f"{source}: expected a table of prompt keys, got {subset!r}")
        prompts.append(prompt_from_dict({**defaults, **subset}, source, i, size_multiple))
    return prompts


LOADERS = {".txt": _load_txt, ".json": _load_json, ".toml": _load_toml}


def load_sample_prompts(path: str, size_multiple: int = SDXL_SIZE_MULTIPLE) -> List[SamplePrompt]:
    """The prompts of a `.txt`, `.json` or `.toml` file; ValueError naming the file and line/entry if one is bad."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOADERS:
        raise ValueError(f"{path}: a prompt file must end in .txt, .toml or .json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = LOADERS[extension](path, size_multiple)
    if not prompts:
        raise ValueError(f"{path}: contains no prompts")
    return prompts


def check_sample_prompts(path: Optional[str], default_sampler: str = DEFAULT_TRAINING_SAMPLER,
                         size_multiple: int = SDXL_SIZE_MULTIPLE, option: str = "--sample_prompts"
                         ) -> List[SamplePrompt]:
    """What the trainer calls before loading models: the prompts, or a ValueError / FileNotFoundError whose
    message starts with `option` and names the file, the line or entry and the problem. [] when `path` is None.

    Besides the file itself it checks each prompt's steps against its sampler (`default_sampler` for prompts
    without `--ss`): pndm needs at least 4."""
    if path is None:
        return []
    check_sampler(default_sampler, what="--sample_sampler")
    try:
        prompts = load_sample_prompts(path, size_multiple)
        for p in prompts:
            check_sampler(p.sampler or default_sampler, p.steps, what=f"{p.source}: sampler")
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{option}: {e}") from None
    return prompts


__all__ = ["SamplePrompt", "load_sample_prompts", "check_sample_prompts", "parse_prompt_line", "prompt_from_dict"]
