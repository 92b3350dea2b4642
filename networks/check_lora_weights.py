"""Print what a LoRA `.safetensors` file holds: metadata, modules with their dims and alphas, tensor statistics.

    python networks/check_lora_weights.py my_lora.safetensors [-s]

The per-tensor lines `key,shape,mean(|w|),min(|w|)` are in upstream's format (shape as `(a-b)`); `-s` also
lists the tensors that are not lora_up/lora_down (alphas and anything unexpected).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import lora_io  # noqa: E402


def describe(path: str, show_all_keys: bool = False) -> str:
    tensors, metadata = lora_io.read_lora_file(path)
    dims, alphas = lora_io.modules_dims_and_alphas(tensors)
    lines = [f"file: {path}", f"metadata: {len(metadata)} entries"]
    lines += [f"  {key}: {value}" for key, value in sorted(metadata.items())]

    counts = {}
    for name in dims:
        part = name.split("_")[1] if name.startswith("lora_") else "other"
        counts[part] = counts.get(part, 0) + 1
    lines.append(f"modules: {len(dims)} (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")")
    lines.append("module,dim,alpha,lora_down shape")
    for name in sorted(dims):
        down = tensors[f"{name}.{lora_io.LORA_DOWN}"]
        lines.append(f"{name},{dims[name]},{alphas[name]:g},{_shape(down)}")

    lora_keys = [k for k in tensors if "lora_up" in k or "lora_down" in k]
    lines.append(f"number of LoRA modules: {len(lora_keys)}")  # upstream counts up/down tensors, not modules
    keys = lora_keys + ([k for k in tensors if k not in lora_keys] if show_all_keys else [])
    if show_all_keys:
        lines.append(f"number of all modules: {len(keys)}")
    for key in keys:
        value = np.abs(np.asarray(tensors[key], dtype=np.float32))
        lines.append(f"{key},{_shape(value)},{value.mean()},{value.min()}")
    return "\n".join(lines)


def _shape(value) -> str:
    return str(tuple(value.shape)).replace(", ", "-")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=str, help="LoRA .safetensors file to inspect")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list alphas and other tensors")
    return parser


def main(argv=None):
    args = setup_parser().parse_args(argv)
    try:
        print(describe(args.file, args.show_all_keys))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
