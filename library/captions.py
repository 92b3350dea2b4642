"""Caption files and caption processing, in the order Kohya's sd-scripts applies them.

`process_caption` reads its options from `settings`, any object with the subset options of the
dataset config (a subset's params from config_util): caption_prefix, caption_suffix,
caption_dropout_rate, caption_dropout_every_n_epochs, enable_wildcard, shuffle_caption,
caption_separator, keep_tokens, keep_tokens_separator, token_warmup_min, token_warmup_step,
caption_tag_dropout_rate, secondary_separator. Randomness comes from the `rng` passed in, so a
caller that seeds it per batch gets reproducible captions.
"""

import math
import os
import random
import re
from typing import Dict, Iterable, List, Optional

# A sentinel that cannot appear in a caption file (it is not printable text), used while `{{`/`}}`
# escapes are protected from wildcard expansion.
_OPEN_ESCAPE = "\x00<\x00"
_CLOSE_ESCAPE = "\x00>\x00"
_WILDCARD = re.compile(r"\{([^}]+)\}")


def read_caption_file(image_path: str, caption_extension: str, enable_wildcard: bool) -> Optional[str]:
    """The caption for an image, or None when there is no caption file.

    Looks for `<stem><ext>`, then for the stem without a face-crop suffix `_cx_cy_w_h`. Without
    wildcards only the first line counts; with them all non-empty lines are kept, joined by newlines
    (one is picked at random per step)."""
    stem = os.path.splitext(image_path)[0]
    parts = stem.split("_")
    candidates = [stem + caption_extension]
    if len(parts) >= 5:
        candidates.append("_".join(parts[:-4]) + caption_extension)
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rt", encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption file is not valid UTF-8: {path} ({e})") from None
        if not lines:
            raise ValueError(f"caption file is empty: {path}")
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip())
        return lines[0].strip()
    return None


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then replace each `{a|b|c}` by one choice;
    `{{` and `}}` stand for literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    caption = caption.replace("{{", _OPEN_ESCAPE).replace("}}", _CLOSE_ESCAPE)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(_OPEN_ESCAPE, "{").replace(_CLOSE_ESCAPE, "}")


def resolve_token_warmup_step(token_warmup_step: float, max_train_steps: int) -> int:
    """A warmup below 1 is a fraction of the training steps."""
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return token_warmup_step


def _split_tags(text: str, separator: str, drop_empty: bool) -> List[str]:
    tags = [t.strip() for t in text.split(separator)]
    return [t for t in tags if t] if drop_empty else tags


def process_caption(
    settings,
    caption: str,
    rng: random.Random,
    current_epoch: int = 0,
    current_step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """Apply prefix/suffix, caption dropout, wildcards, keep-tokens shuffle, token warmup, tag dropout
    and the secondary separator, in upstream's order. `current_epoch` counts from 1 as upstream's
    dataset sees it (so every-n-epochs dropout fires on epochs n, 2n, ...)."""
    if settings.caption_prefix:
        caption = settings.caption_prefix + " " + caption
    if settings.caption_suffix:
        caption = caption + " " + settings.caption_suffix

    # The rate is drawn only when it is positive, so that rng use matches upstream's sequence.
    dropped = settings.caption_dropout_rate > 0 and rng.random() < settings.caption_dropout_rate
    every_n = settings.caption_dropout_every_n_epochs
    if dropped or (every_n > 0 and current_epoch % every_n == 0):
        return ""

    if settings.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup_step = resolve_token_warmup_step(settings.token_warmup_step, max_train_steps)
    if settings.shuffle_caption or warmup_step > 0 or settings.caption_tag_dropout_rate > 0:
        caption = _shuffle_and_drop_tags(settings, caption, rng, current_step, warmup_step)

    if settings.secondary_separator:
        caption = caption.replace(settings.secondary_separator, settings.caption_separator)
    return caption


def _shuffle_and_drop_tags(settings, caption, rng, current_step, warmup_step) -> str:
    separator = settings.caption_separator
    keep_separator = settings.keep_tokens_separator
    fixed_suffix: List[str] = []
    if keep_separator and keep_separator in caption:
        # "fixed ||| flexible ||| fixed suffix": only the middle part is shuffled and dropped
        fixed_part, flex_part = caption.split(keep_separator, 1)
        if keep_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_separator, 1)
            fixed_suffix = _split_tags(suffix_part, separator, drop_empty=True)
        fixed = _split_tags(fixed_part, separator, drop_empty=True)
        flex = _split_tags(flex_part, separator, drop_empty=True)
    else:
        tags = _split_tags(caption.strip(), separator, drop_empty=False)
        fixed, flex = tags[: settings.keep_tokens], tags[settings.keep_tokens :]

    if warmup_step and current_step < warmup_step:
        count = math.floor(current_step * ((len(flex) - settings.token_warmup_min) / warmup_step))
        flex = flex[: count + settings.token_warmup_min]

    if settings.shuffle_caption:
        rng.shuffle(flex)
    if settings.caption_tag_dropout_rate > 0:
        flex = [tag for tag in flex if rng.random() >= settings.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


def caption_for_cached_text_encoder(settings, caption: str) -> str:
    """The caption whose text-encoder outputs are cached: the deterministic steps only.

    Upstream caches the raw caption, silently dropping caption_prefix/suffix and the secondary
    separator; we apply them (random steps are refused by `is_text_encoder_output_cacheable`)."""
    if settings.caption_prefix:
        caption = settings.caption_prefix + " " + caption
    if settings.caption_suffix:
        caption = caption + " " + settings.caption_suffix
    caption = caption.split("\n")[0]
    if settings.secondary_separator:
        caption = caption.replace(settings.secondary_separator, settings.caption_separator)
    return caption


def count_tags(captions: Iterable[str], frequency: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tag frequency for the `ss_tag_frequency` metadata: comma-separated, stripped, lower-cased."""
    frequency = {} if frequency is None else frequency
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    return frequency
