"""SDXL tokenization as Kohya's `SdxlTokenizeStrategy` does it, from the tokenizer files bundled in configs/tokenizer/.

Both encoders share CLIP's BPE vocabulary. They differ in padding: CLIP-L (TE1) pads with the end token
`<|endoftext|>` (49407); OpenCLIP bigG (TE2) pads with id 0 (`!`), as open_clip does.

`--max_token_length` 75/150/225 tokenizes to 77/152/227 ids, then cuts that into 1/2/3 windows of 77 ids
(`[BOS] + 75 tokens + [last id]`) that the encoders see one at a time; `sdxl_text_encoding.encode_tokens_sdxl`
glues their hidden states back together.
"""

import logging
import os
from typing import List, Optional, Tuple, Union

import numpy as np
from transformers import CLIPTokenizer

from library import prompt_weights

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_TOKENIZER_DIR = os.path.join(REPO_ROOT, "configs", "tokenizer")
# upstream's hub ids; they name the --tokenizer_cache_dir sub-folders, so a Kohya cache folder works here too
TOKENIZER1_PATH = "openai/clip-vit-large-patch14"
TOKENIZER2_PATH = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
TOKENIZER2_PAD_TOKEN = "!"  # id 0

VALID_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def input_ids_length(max_token_length: Optional[int]) -> int:
    """Ids per text for `--max_token_length` (None, 75, 150 or 225): 77, 77, 152 or 227 (BOS and EOS added)."""
    if max_token_length not in VALID_MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be None, 75, 150 or 225, got {max_token_length!r}")
    return 77 if max_token_length is None else max_token_length + 2


def load_tokenizer(model_id: str, tokenizer_cache_dir: Optional[str] = None, **overrides) -> CLIPTokenizer:
    """The bundled CLIP tokenizer; with a cache dir, the copy saved there (saved on first use, as upstream)."""
    cache_path = os.path.join(tokenizer_cache_dir, model_id.replace("/", "_")) if tokenizer_cache_dir else None
    if cache_path and os.path.exists(cache_path):
        logger.info(f"load tokenizer from cache: {cache_path}")
        return CLIPTokenizer.from_pretrained(cache_path)

    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR, **overrides)
    if cache_path:
        logger.info(f"save tokenizer to cache: {cache_path}")
        tokenizer.save_pretrained(cache_path)
    return tokenizer


def load_zero_pad_tokenizer(model_id: str, tokenizer_cache_dir: Optional[str] = None) -> CLIPTokenizer:
    """The bundled tokenizer padding with id 0 (`!`), as open_clip's encoders (SDXL's TE2, SD2's) were trained."""
    tokenizer = load_tokenizer(model_id, tokenizer_cache_dir, pad_token=TOKENIZER2_PAD_TOKEN)
    tokenizer.pad_token_id = 0  # also for a cache folder written by upstream (which keeps its hub pad)
    return tokenizer


def get_input_ids(tokenizer: CLIPTokenizer, text: str, max_length: int) -> np.ndarray:
    """Token ids of one text as (n_windows, 77) int32; `max_length` counts BOS and EOS (77, 152 or 227)."""
    ids = np.asarray(tokenizer(text, padding="max_length", truncation=True, max_length=max_length).input_ids, np.int32)
    return split_into_windows(tokenizer, ids)


def get_weighted_input_ids(tokenizer: CLIPTokenizer, text: str, max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32, weights float32), both (n_windows, 77), of a caption in the `(word:1.2)` syntax (see
    library/prompt_weights); each window's BOS and last position weigh 1.0."""
    ids, weights = prompt_weights.tokenize_with_weights(tokenizer, text, max_length)
    windows = split_into_windows(tokenizer, ids)
    if len(windows) == 1:
        return windows, weights[None]
    inner = tokenizer.model_max_length - 2  # 75 tokens per window
    window_weights = np.ones(windows.shape, np.float32)
    for i in range(len(windows)):
        window_weights[i, 1:-1] = weights[1 + i * inner : 1 + (i + 1) * inner]
    return windows, window_weights


def split_into_windows(tokenizer: CLIPTokenizer, ids: np.ndarray) -> np.ndarray:
    """The `max_length` ids of one text (77, 152 or 227) as (n_windows, 77) windows of BOS + 75 tokens + last id."""
    window, max_length = tokenizer.model_max_length, len(ids)  # window: 77
    if max_length <= window:
        return ids[None]

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_length - window + 2, window - 2):  # 1, 76, 151: 75 tokens each
        chunk = np.concatenate([ids[:1], ids[start : start + window - 2], ids[-1:]])
        if pad != eos:
            # TE2 (pad 0): a window cut inside the text must still end with EOS ...
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            # ... and a window holding no text at all reads as an empty prompt: BOS EOS PAD ...
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return np.stack(chunks)


class SdxlTokenizeStrategy:
    """Tokenizes captions for both SDXL text encoders.

    `max_length` is `--max_token_length` (None, 75, 150 or 225), without BOS/EOS, as upstream names it.
    """

    def __init__(self, max_length: Optional[int] = None, tokenizer_cache_dir: Optional[str] = None):
        self.max_length = input_ids_length(max_length)
        self.tokenizer1 = load_tokenizer(TOKENIZER1_PATH, tokenizer_cache_dir)
        self.tokenizer2 = load_zero_pad_tokenizer(TOKENIZER2_PATH, tokenizer_cache_dir)

    def tokenize(self, text: Union[str, List[str]]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids1, ids2): int32 arrays of shape (n, 77) for one text, (B, n, 77) for a list of B texts."""
        if isinstance(text, str):
            return (get_input_ids(self.tokenizer1, text, self.max_length),
                    get_input_ids(self.tokenizer2, text, self.max_length))
        return (
            np.stack([get_input_ids(self.tokenizer1, t, self.max_length) for t in text]),
            np.stack([get_input_ids(self.tokenizer2, t, self.max_length) for t in text]),
        )

    def tokenize_with_weights(self, text: Union[str, List[str]]) -> Tuple[Tuple[np.ndarray, np.ndarray],
                                                                        Tuple[np.ndarray, np.ndarray]]:
        """((ids1, ids2), (weights1, weights2)) of `--weighted_captions` captions: int32 ids and float32 weights,
        each (n, 77) for one text, (B, n, 77) for a list."""
        if isinstance(text, str):
            (ids1, weights1), (ids2, weights2) = (get_weighted_input_ids(tok, text, self.max_length)
                                                  for tok in (self.tokenizer1, self.tokenizer2))
            return (ids1, ids2), (weights1, weights2)
        per_text = [self.tokenize_with_weights(t) for t in text]
        return (
            tuple(np.stack([ids[k] for ids, _ in per_text]) for k in range(2)),
            tuple(np.stack([weights[k] for _, weights in per_text]) for k in range(2)),
        )
