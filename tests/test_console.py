"""library/console.py: the scripts import without third-party noise, and Kohya's --console_log_* flags."""

import contextlib
import logging
import os
import subprocess
import sys
import warnings

import pytest

import sdxl_minimal_inference
import sdxl_train_network
import train_network
from library import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scripts_import_silently_without_the_users_settings():
    env = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "TRANSFORMERS_VERBOSITY")}
    code = "import sdxl_train_network, sdxl_minimal_inference"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    # before: MindSpore's "[WARNING] ME(...)" deprecation line, transformers' "None of PyTorch, TensorFlow >= 2.0,
    # or Flax have been found" (twice), mindone's FutureWarning and "Config not found for parakeet" (3 times)
    assert result.stdout + result.stderr == ""


def test_quiet_import_swallows_prints_and_future_warnings(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with console.quiet_import():
            print("Config not found for parakeet")
            warnings.warn("deprecated", FutureWarning)
        warnings.warn("still shown", UserWarning)
    assert capsys.readouterr().out == ""
    assert [str(w.message) for w in caught] == ["still shown"]


@pytest.mark.parametrize("setup_parser", [train_network.setup_parser, sdxl_train_network.setup_parser,
                                          sdxl_minimal_inference.setup_parser])
def test_every_script_takes_the_console_flags(setup_parser):
    required = ["--ckpt_path", "x"] if setup_parser is sdxl_minimal_inference.setup_parser else []
    args = setup_parser().parse_args(required + ["--console_log_level", "DEBUG", "--console_log_file", "log.txt",
                                                 "--console_log_simple"])
    assert (args.console_log_level, args.console_log_file, args.console_log_simple) == ("DEBUG", "log.txt", True)
    assert setup_parser().parse_args(required).console_log_level is None  # upstream's default; INFO is applied


@contextlib.contextmanager
def bare_root_logger():
    """The root logger without pytest's capture handlers (which it adds for each test phase), restored after."""
    handlers, level = logging.root.handlers[:], logging.root.level
    logging.root.handlers = []
    yield
    for handler in logging.root.handlers:
        handler.close()
    logging.root.handlers, logging.root.level = handlers, level


def parse(*argv):
    return sdxl_train_network.setup_parser().parse_args(list(argv))


def test_default_logging_is_info_with_level_and_logger_on_stderr(capfd):
    with bare_root_logger():
        console.setup_logging(parse())
        logging.getLogger("library.x").info("hello")
        logging.getLogger("library.x").debug("hidden")
    assert capfd.readouterr().err == "INFO library.x: hello\n"


def test_simple_logging_prints_messages_on_stdout_at_the_given_level(capfd):
    with bare_root_logger():
        console.setup_logging(parse("--console_log_simple", "--console_log_level", "WARNING"))
        logging.getLogger("library.x").info("hidden")
        logging.getLogger("library.x").warning("careful")
    assert capfd.readouterr().out == "careful\n"


def test_file_logging(tmp_path, capfd):
    path = tmp_path / "log.txt"
    path.write_text("previous run\n")
    with bare_root_logger():
        console.setup_logging(parse("--console_log_file", str(path), "--console_log_level", "DEBUG"))
        logging.getLogger("library.x").debug("details")
    assert path.read_text() == "DEBUG library.x: details\n"  # overwritten, as upstream
    assert capfd.readouterr().err == ""
