"""SD 1.x / 2.x text conditioning as Kohya's `SdTextEncodingStrategy` (formerly `train_util.get_hidden_states`)
computes it, written with mindspore ops so it can run inside a graph-mode cell.

From ids of shape (B, n, 77) (n = 1, 2 or 3 windows, see sd_tokenize), each window through the text encoder
(a `CLIPTextModel`: CLIP-L for SD1, for SD2 OpenCLIP-H converted with its last resblock dropped, so SD2's "last
layer" is the original penultimate one):
- without clip_skip: last_hidden_state (the last layer through the final LayerNorm);
- with clip_skip N: hidden_states[-N] through the final LayerNorm (N = 1 is the same as none, 2 the penultimate).
With n > 1 the windows are glued back into n*75 + 2 positions by `sdxl_text_encoding.merge_windows`, for SD1 and
SD2 alike. Upstream's SD2 branch has an extra step meant for empty windows (copy the first pad's state over the
end token's) but it compares an id tensor with the token *string* `"<|endoftext|>"`, which is never equal, so it
never runs; we keep upstream's actual result (no such step), so the same ids give upstream's conditioning.
"""

from typing import Optional

from library.graph_reuse import GraphEntry
from library.sdxl_text_encoding import merge_windows


def check_clip_skip(text_encoder, clip_skip: Optional[int]):
    """Refuses a clip_skip that names no layer of this encoder (upstream's 0 would silently take the embeddings)."""
    num_layers = len(text_encoder.text_model.encoder.layers)
    if clip_skip is not None and not (isinstance(clip_skip, int) and 1 <= clip_skip <= num_layers):
        raise ValueError(f"--clip_skip must be between 1 and {num_layers} (the text encoder's layers), "
                         f"got {clip_skip!r}")


def encode_tokens_sd(text_encoder, input_ids, clip_skip: Optional[int] = None, dtype=None):
    """Conditioning (B, L, C) for ids (B, n, 77): L = 77 or n*75 + 2, C = 768 (SD1) or 1024 (SD2).

    `dtype` (a mindspore dtype) casts the result, as upstream's `weight_dtype`; None keeps the encoder's.
    """
    batch_size, n_windows, window = input_ids.shape
    input_ids = input_ids.reshape(batch_size * n_windows, window)
    last_hidden_state, _, hidden_states = text_encoder.text_model(input_ids)
    if clip_skip is None:
        states = last_hidden_state
    else:
        states = text_encoder.text_model.final_layer_norm(hidden_states[-clip_skip])
    states = merge_windows(states, batch_size, n_windows)
    return states if dtype is None else states.astype(dtype)


class SdTextEncoder(GraphEntry):  # a top-level graph for caching and inference
    """The text encoder with its clip_skip as one cell: construct(ids (B, n, 77)) -> conditioning (B, L, C)."""

    def __init__(self, text_encoder, clip_skip: Optional[int] = None, dtype=None):
        super().__init__()
        check_clip_skip(text_encoder, clip_skip)
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.output_dtype = dtype

    def construct(self, input_ids):
        return encode_tokens_sd(self.text_encoder, input_ids, self.clip_skip, self.output_dtype)
