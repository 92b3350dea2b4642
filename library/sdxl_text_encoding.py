"""SDXL text conditioning as Kohya's `SdxlTextEncodingStrategy` computes it, written with mindspore ops so it
can run inside a graph-mode cell.

From ids of shape (B, n, 77) (n = 1, 2 or 3 windows, see sdxl_tokenize):
- hidden_state1: TE1's penultimate layer (hidden_states[11] of CLIP-L's 12), without the final LayerNorm;
- hidden_state2: TE2's penultimate layer, without the final LayerNorm;
- pool2: TE2's last_hidden_state (after the final LayerNorm) at the FIRST end token, through text_projection.
  HF's own pooling takes the position of the highest id instead; upstream avoids it so that added tokens with
  larger ids (textual inversion) cannot move the pool, and we do the same.
With n > 1 the windows' hidden states are glued back into one sequence of n*75 + 2 positions:
`[BOS of window 0] + tokens 1..75 of every window + [last position of the last window]`; pool2 is window 0's.
"""

import mindspore as ms
from mindspore import nn, ops

EOS_TOKEN_ID = 49407


def pool_at_first_eos(te2, last_hidden_state, input_ids):
    """text_projection(last_hidden_state at the first EOS of each row); a row without EOS pools position 0."""
    eos_index = ops.argmax((input_ids == EOS_TOKEN_ID).astype(ms.int32), dim=1)
    pooled = ops.gather(last_hidden_state, eos_index, 1, batch_dims=1)
    return te2.text_projection(pooled)


def merge_windows(states, batch_size: int, n_windows: int):
    """(B*n, 77, C) -> (B, n*75 + 2, C): BOS of window 0, the 75 inner positions of each window, last position."""
    window = states.shape[1]
    states = states.reshape(batch_size, n_windows * window, states.shape[-1])
    if n_windows == 1:
        return states
    parts = [states[:, :1]]
    for i in range(n_windows):
        parts.append(states[:, i * window + 1 : (i + 1) * window - 1])
    parts.append(states[:, -1:])
    return ops.cat(parts, axis=1)


def encode_tokens_sdxl(te1, te2, ids1, ids2):
    """(hidden_state1 (B, L, C1), hidden_state2 (B, L, C2), pool2 (B, P)) for ids (B, n, 77), L = 77 or n*75+2.

    te1 is a `CLIPTextModel`, te2 a `CLIPTextModelWithProjection` (or cells with the same tuple outputs).
    """
    batch_size, n_windows, window = ids1.shape
    ids1 = ids1.reshape(batch_size * n_windows, window)
    ids2 = ids2.reshape(batch_size * n_windows, window)

    hidden1 = te1.text_model(ids1)[2][-2]
    last_hidden2, _, all_hidden2 = te2.text_model(ids2)
    hidden2 = all_hidden2[-2]
    pool2 = pool_at_first_eos(te2, last_hidden2, ids2)

    hidden1 = merge_windows(hidden1, batch_size, n_windows)
    hidden2 = merge_windows(hidden2, batch_size, n_windows)
    pool2 = pool2.reshape(batch_size, n_windows, pool2.shape[-1])[:, 0]
    return hidden1, hidden2, pool2


def apply_token_weights(hidden_states, weights):
    """`--weighted_captions`: hidden states (B, L, C) times the per-token weights (B, n, 77), glued like the
    hidden states (BOS and last position weigh 1.0). As upstream: no rescaling to the original mean."""
    batch_size, n_windows, window = weights.shape
    weights = merge_windows(weights.reshape(batch_size * n_windows, window, 1), batch_size, n_windows)
    return (hidden_states * weights).astype(hidden_states.dtype)


def encode_tokens_with_weights_sdxl(te1, te2, ids1, ids2, weights1, weights2):
    """`encode_tokens_sdxl` with each encoder's hidden states weighted per token; pool2 is not weighted (upstream's
    `encode_tokens_with_weights`)."""
    hidden1, hidden2, pool2 = encode_tokens_sdxl(te1, te2, ids1, ids2)
    return apply_token_weights(hidden1, weights1), apply_token_weights(hidden2, weights2), pool2


class SdxlTextEncoders(nn.Cell):
    """Both text encoders as one cell: construct(ids1, ids2) -> (hidden_state1, hidden_state2, pool2)."""

    def __init__(self, text_encoder1, text_encoder2):
        super().__init__()
        self.text_encoder1 = text_encoder1
        self.text_encoder2 = text_encoder2

    def construct(self, ids1, ids2):
        return encode_tokens_sdxl(self.text_encoder1, self.text_encoder2, ids1, ids2)
