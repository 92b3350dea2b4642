"""Folders a run writes to are created and test-written before any model loads (train_util.check_output_paths)."""

import errno
import os
import re
import types

import pytest

import sdxl_train_network
from library import train_util


def args_with(**paths):
    values = {flag: None for flag in train_util.OUTPUT_DIR_FLAGS}
    values.update(paths)
    return types.SimpleNamespace(**values)


def test_folders_are_created(tmp_path):
    paths = {flag: str(tmp_path / flag / "nested") for flag in train_util.OUTPUT_DIR_FLAGS}
    train_util.check_output_paths(args_with(**paths))
    for path in paths.values():
        assert os.path.isdir(path) and os.listdir(path) == []  # the probe file is gone


def test_parent_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    bad = str(tmp_path / "notes.txt" / "out")
    with pytest.raises(ValueError, match=re.escape(f"--logging_dir {bad}: cannot write there: "
                                                   f"{tmp_path / 'notes.txt'} is a file, not a folder")):
        train_util.check_output_paths(args_with(output_dir=str(tmp_path / "ok"), logging_dir=bad))


def test_path_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="--output_dir .*out: cannot write there: it is a file, not a folder"):
        train_util.check_output_paths(args_with(output_dir=str(tmp_path / "out")))


def test_read_only_folder(tmp_path, monkeypatch):
    # the tests run as root, whom chmod does not stop, so the failing write of the probe file is simulated
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(train_util.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"--compile_cache_dir \S+: cannot write there: Read-only file system$"):
        train_util.check_output_paths(args_with(compile_cache_dir=str(tmp_path / "cache")))


def test_training_checks_before_loading_models(tmp_path):
    (tmp_path / "file").write_text("x")
    args = sdxl_train_network.setup_parser().parse_args(
        ["--network_module", "networks.lora", "--output_dir", str(tmp_path / "file" / "out"),
         "--train_data_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors")])
    with pytest.raises(ValueError, match="--output_dir .*: cannot write there: .*file is a file, not a folder"):
        sdxl_train_network.SdxlNetworkTrainer().train(args)
