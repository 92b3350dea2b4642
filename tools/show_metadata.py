"""Print a `.safetensors` file's metadata as sorted, indented JSON (kohya-ss/sd-scripts' tools/show_metadata.py).

    python tools/show_metadata.py my_lora.safetensors
    python tools/show_metadata.py --model my_lora.safetensors      # upstream's spelling
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import lora_io  # noqa: E402

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=None, help=".safetensors file (LoRA or checkpoint)")
    parser.add_argument("--model", type=str, default=None, help="the file, as upstream names the flag")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = setup_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.model is None):
        parser.error("give the file either as an argument or with --model")
    try:
        metadata = lora_io.read_metadata(args.file or args.model)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not metadata:
        logger.error("No metadata found")
    else:
        print(json.dumps(metadata, indent=4, sort_keys=True))


if __name__ == "__main__":
    main()
