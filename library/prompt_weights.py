"""Weighted captions (`--weighted_captions`): the `(word:1.2)` attention syntax of A1111's web UI, parsed and
tokenized as Kohya's `TokenizeStrategy._get_weighted_input_ids` does it.

Syntax: `(text)` multiplies the weights of `text` by 1.1, `[text]` by 1/1.1, `(text:1.3)` by 1.3; brackets nest
and multiply; an unclosed bracket applies to the rest of the text, an unmatched `)` or `]` is literal text;
`\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters, a backslash before anything else is dropped.
Each run of text with one weight is tokenized on its own and its tokens get that weight; BOS, EOS and padding
weigh 1.0. The text encoders' hidden states are multiplied by the weights (see sdxl_text_encoding).

Commas inside brackets break with `shuffle_caption` / tag dropout: the caption is shuffled as text, so a
bracket can be separated from its partner (upstream's documented limit, kept).
"""

import re
from typing import List, Tuple

import numpy as np

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# one token of the syntax per match, tried in this order
_SYNTAX = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\]|\\)        # \( \) \[ \] \\ , or a lone backslash
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)        # closes a round bracket with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)


def parse_prompt_attention(text: str) -> List[Tuple[str, float]]:
    """[(text, weight), ...] of a caption, runs of equal weight merged; [("", 1.0)] for an empty caption."""
    pieces: List[List] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: List[int] = []  # index into pieces where each open bracket started
    open_square: List[int] = []

    def multiply_from(start: int, multiplier: float):
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _SYNTAX.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if match.group("escaped"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round and _is_number(weight):
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            pieces.append([token, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: List[List] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


def _is_number(text: str) -> bool:
    # upstream calls float() unguarded and crashes mid-training on `(word:1.2.3)`; here such a weight is text
    try:
        float(text)
        return True
    except ValueError:
        return False


def tokenize_with_weights(tokenizer, text: str, max_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32, weights float32), both of length `max_length` (BOS and EOS counted): BOS, the weighted tokens
    (at most max_length - 2), EOS, padding."""
    tokens: List[int] = []
    weights: List[float] = []
    for piece, weight in parse_prompt_attention(text):
        piece_ids = tokenizer(piece).input_ids[1:-1]  # without its BOS and EOS
        tokens += piece_ids
        weights += [weight] * len(piece_ids)
        if len(tokens) > max_length - 2:
            break
    tokens, weights = tokens[: max_length - 2], weights[: max_length - 2]
    padding = max_length - 2 - len(tokens)
    ids = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    weights = [1.0] + weights + [1.0] * (padding + 1)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)
