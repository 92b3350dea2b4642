"""Small builders shared by the dataset tests: images, folder trees, a fake tokenizer, args."""

import argparse
import os

import numpy as np
from PIL import Image

from library import config_util, train_util


def write_image(path, width, height, seed=0):
    """A random RGB image (PNG or JPEG by extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_text(path, text, encoding="utf-8"):
    with open(path, "w", encoding=encoding) as f:
        f.write(text)
    return path


def parse_args(argv=()):
    parser = argparse.ArgumentParser()
    train_util.add_dataset_arguments(parser, True, True, True)
    config_util.add_config_arguments(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--prior_loss_weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(list(argv))


class FakeTokenizeStrategy:
    """Same interface as library.sdxl_tokenize: text -> (ids1, ids2), each (n_chunks, 77) int32.
    Ids encode the text's characters so that tests can decode what was tokenized."""

    def __init__(self, n_chunks=1):
        self.n_chunks = n_chunks

    def tokenize(self, text):
        codes = [ord(c) for c in text][: 77 * self.n_chunks]
        ids = np.zeros(77 * self.n_chunks, dtype=np.int32)
        ids[: len(codes)] = codes
        ids = ids.reshape(self.n_chunks, 77)
        return ids, ids + 1

    @staticmethod
    def decode(ids):
        return "".join(chr(c) for c in ids.reshape(-1) if c)


def build_group(toml_text, tmp_path, argv=(), seed=42, tokenize_strategy=None, name="config.toml"):
    config_path = tmp_path / name
    config_path.write_text(toml_text)
    args = parse_args(["--dataset_config", str(config_path), *argv])
    user_config, source = config_util.user_config_from_args(args)
    blueprint = config_util.generate_blueprint(user_config, args, source)
    train, _ = config_util.generate_dataset_group_by_blueprint(blueprint, seed, tokenize_strategy or FakeTokenizeStrategy())
    return train
