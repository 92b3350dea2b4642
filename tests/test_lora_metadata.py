"""library/lora_metadata.py: ss_network_args and the base-model hashes, as upstream's train_network writes them
(the whole key list of a training run is checked in test_train_network.py)."""

import hashlib
import json

import numpy as np
import pytest

import sdxl_train_network
from library import lora_metadata


@pytest.mark.parametrize("argv, expected", [
    # upstream train_network.train: net_kwargs[key] = value for "key=value" (split at the first '='), then, unless
    # --dim_from_weights, `if "dropout" not in net_kwargs: net_kwargs["dropout"] = args.network_dropout`
    (["--network_args", "conv_dim=4", "conv_alpha=1"], {"conv_dim": "4", "conv_alpha": "1", "dropout": None}),
    (["--network_args", "conv_dim=4", "--network_dropout", "0.1"], {"conv_dim": "4", "dropout": 0.1}),
    (["--network_args", "dropout=0.2", "--network_dropout", "0.1"], {"dropout": "0.2"}),
    (["--network_args", "block_dims=2,4,4", "--dim_from_weights"], {"block_dims": "2,4,4"}),
    (["--network_args", "loraplus_lr_ratio=a=b"], {"loraplus_lr_ratio": "a=b", "dropout": None}),
])
def test_network_kwargs_as_upstream(argv, expected):
    args = sdxl_train_network.setup_parser().parse_args(argv)
    assert lora_metadata.network_kwargs(args) == expected
    assert json.dumps(lora_metadata.network_kwargs(args)) == json.dumps(expected)  # key order too


def test_model_hashes_as_upstream(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * 1024 * 1024 + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    # upstream train_util.model_hash: seek(0x100000), sha256 of read(0x10000), first 8 hex digits
    assert lora_metadata.model_hash(str(path)) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    # upstream train_util.calculate_sha256: the whole file
    assert lora_metadata.calculate_sha256(str(path)) == hashlib.sha256(data).hexdigest()
