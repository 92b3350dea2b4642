"""Derive the HF `CLIPTokenizer` files bundled in configs/tokenizer/ from OpenAI's CLIP BPE file.

Both SDXL text encoders use this one vocabulary (CLIP-L and OpenCLIP bigG differ only in the pad token, which
library/sdxl_tokenize.py sets). The vocabulary is built the way OpenAI's `clip/simple_tokenizer.py` builds it:
the 256 byte-level characters, the same with `</w>` (end of word), one token per merge, then the start and
end tokens: 49408 tokens, `<|startoftext|>` = 49406, `<|endoftext|>` = 49407.

    python tools/make_tokenizer_files.py [--bpe PATH/bpe_simple_vocab_16e6.txt.gz] [--out configs/tokenizer]
"""

import argparse
import gzip
import json
import os
import shutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BPE = os.path.join(REPO_ROOT, "..", "shared", "data", "clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
DEFAULT_OUT = os.path.join(REPO_ROOT, "configs", "tokenizer")

NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte -> printable character table (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_vocab_and_merges(bpe_path: str):
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is the file's version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like CLIP's BPE file (expected {NUM_MERGES} merge pairs)")

    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)}")
    return vocab, merges


def write_tokenizer_files(bpe_path: str, out_dir: str) -> None:
    vocab, merges = build_vocab_and_merges(bpe_path)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # HF skips the first line, as CLIP does
        f.write("\n".join(" ".join(m) for m in merges) + "\n")

    # CLIP-L's (openai/clip-vit-large-patch14) settings: pad is the end token; sdxl_tokenize sets bigG's pad
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True,
                  errors="replace", add_prefix_space=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    shutil.copyfile(os.path.join(os.path.dirname(bpe_path), "LICENSE"), os.path.join(out_dir, "LICENSE"))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out_dir}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bpe", default=DEFAULT_BPE, help="bpe_simple_vocab_16e6.txt.gz (its LICENSE is copied too)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    write_tokenizer_files(args.bpe, args.out)


if __name__ == "__main__":
    main()
