"""What the scripts print: third-party noise kept off the console, and Kohya's `--console_log_*` flags.

`quiet_third_party_output()` must run before `import mindspore`: MindSpore reads GLOG_v when its C++ library
loads, and its default level prints `[WARNING] CORE(...)` lines by the hundred while a graph is built. A GLOG_v
or TRANSFORMERS_VERBOSITY the user set is kept.
"""

import contextlib
import io
import logging
import os
import sys
import warnings

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def quiet_third_party_output():
    os.environ.setdefault("GLOG_v", "3")  # MindSpore (C++ and Python side): errors only
    # transformers (under mindone) warns at import that torch/TensorFlow/Flax are missing; none is needed here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextlib.contextmanager
def quiet_import():
    """Around the first import of mindone.transformers: registering its models print()s "Config not found for
    parakeet" (transformers' auto_docstring) and raises a FutureWarning, neither of which concerns the user."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def add_logging_arguments(parser):
    """Upstream's flags (library/utils.py add_logging_arguments)."""
    parser.add_argument("--console_log_level", type=str, default=None, choices=LOG_LEVELS,
                        help="logging level (default INFO)")
    parser.add_argument("--console_log_file", type=str, default=None, help="log to this file instead of the console")
    parser.add_argument("--console_log_simple", action="store_true", help="messages only, without level and logger")


def setup_logging(args):
    """One handler on the root logger, as upstream's setup_logging: the file of --console_log_file (overwritten),
    else stderr; --console_log_simple prints the bare messages on stdout as upstream's plain handler does.
    Upstream's default handler is rich's; here it is the level and logger name before each message.

    As upstream (and logging.basicConfig), nothing changes when the root logger already has a handler."""
    if logging.root.handlers:
        return
    if args.console_log_file:
        handler = logging.FileHandler(args.console_log_file, mode="w", encoding="utf-8")
    elif args.console_log_simple:
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if args.console_log_simple else LOG_FORMAT))
    logging.root.addHandler(handler)
    logging.root.setLevel(getattr(logging, args.console_log_level or "INFO"))
