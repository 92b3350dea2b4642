"""`--config_file` TOML files as upstream reads them: sections flattened, the command line wins, unknown keys warned
about and skipped (shared configs carry other scripts' keys)."""

import logging

import pytest

import sdxl_train_network
from library import train_util


def read(tmp_path, text, *argv):
    config = tmp_path / "train.toml"
    config.write_text(text)
    argv = ["--config_file", str(config), *argv]
    parser = sdxl_train_network.setup_parser()
    return train_util.read_config_from_file(parser.parse_args(argv), parser, argv)


def test_sections_are_flattened_and_the_command_line_wins(tmp_path):
    args = read(tmp_path, '[model]\npretrained_model_name_or_path = "base.safetensors"\n'
                          '[training]\nlearning_rate = 0.002\nmax_train_steps = 7\nsample_sampler = "euler_a"\n',
                "--max_train_steps", "9")
    assert args.pretrained_model_name_or_path == "base.safetensors"
    assert args.learning_rate == 0.002 and args.sample_sampler == "euler_a"
    assert args.max_train_steps == 9


def test_unknown_keys_are_warned_about_by_name_and_skipped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        args = read(tmp_path, '[training]\nlearning_rate = 0.002\nblocks_to_swap = 4\n[extra]\nfp8_scaled = true\n')
    assert args.learning_rate == 0.002
    assert not hasattr(args, "blocks_to_swap") and not hasattr(args, "fp8_scaled")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"--config_file {tmp_path / 'train.toml'}: unknown key 'blocks_to_swap' ignored (not an argument of this script)",
        f"--config_file {tmp_path / 'train.toml'}: unknown key 'fp8_scaled' ignored (not an argument of this script)",
    ]


def test_a_missing_or_broken_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="invalid TOML"):
        read(tmp_path, "learning_rate = = 1\n")
    parser = sdxl_train_network.setup_parser()
    argv = ["--config_file", str(tmp_path / "absent.toml")]
    with pytest.raises(SystemExit, match=r"absent\.toml not found"):
        train_util.read_config_from_file(parser.parse_args(argv), parser, argv)
