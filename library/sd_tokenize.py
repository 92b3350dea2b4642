"""SD 1.x / 2.x tokenization as Kohya's `SdTokenizeStrategy` does it, with the tokenizer files bundled in
configs/tokenizer/ (the pieces are sdxl_tokenize's: SDXL's two encoders are SD1's and SD2's kinds).

SD1's CLIP-L pads with the end token `<|endoftext|>` (49407); SD2's OpenCLIP-H uses the same BPE but pads with
id 0 (`!`), like SDXL's TE2. `--max_token_length` 150/225 cuts the ids into 2/3 windows of 77, with the same
per-window end-token fix-ups for SD2 as for SDXL's TE2; `sd_text_encoding.encode_tokens_sd` glues the windows'
hidden states back together.
"""

from typing import List, Optional, Tuple, Union

import numpy as np

from library.sdxl_tokenize import (TOKENIZER1_PATH, get_input_ids, get_weighted_input_ids, input_ids_length,
                                   load_tokenizer, load_zero_pad_tokenizer)

# upstream's hub id for SD2's tokenizer (v2 and v2.1 share it); it names the --tokenizer_cache_dir sub-folder
V2_TOKENIZER_PATH = "stabilityai/stable-diffusion-2"


class SdTokenizeStrategy:
    """Tokenizes captions for the SD1 (`v2=False`) or SD2 (`v2=True`) text encoder.

    `max_length` is `--max_token_length` (None, 75, 150 or 225), without BOS/EOS, as upstream names it.
    """

    def __init__(self, v2: bool, max_length: Optional[int] = None, tokenizer_cache_dir: Optional[str] = None):
        self.max_length = input_ids_length(max_length)
        if v2:
            self.tokenizer = load_zero_pad_tokenizer(V2_TOKENIZER_PATH, tokenizer_cache_dir)
        else:
            self.tokenizer = load_tokenizer(TOKENIZER1_PATH, tokenizer_cache_dir)

    def tokenize(self, text: Union[str, List[str]]) -> np.ndarray:
        """int32 ids of shape (n, 77) for one text, (B, n, 77) for a list of B texts (n = 1, 2 or 3 windows)."""
        if isinstance(text, str):
            return get_input_ids(self.tokenizer, text, self.max_length)
        return np.stack([get_input_ids(self.tokenizer, t, self.max_length) for t in text])

    def tokenize_with_weights(self, text: Union[str, List[str]]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids int32, weights float32) of `--weighted_captions` captions, each (n, 77) for one text, (B, n, 77) for
        a list (library/prompt_weights)."""
        if isinstance(text, str):
            return get_weighted_input_ids(self.tokenizer, text, self.max_length)
        per_text = [get_weighted_input_ids(self.tokenizer, t, self.max_length) for t in text]
        return np.stack([ids for ids, _ in per_text]), np.stack([weights for _, weights in per_text])
