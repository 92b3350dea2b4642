"""Training logs for `--log_with tensorboard|wandb|all`: one TrainingLogger with a TensorBoard (tensorboardX) and a
wandb backend, upstream's directory layout, tag names and wandb calls.

Upstream logs through accelerate's trackers; what they do, and this module does alike:
- the tracker (project) name is `--log_tracker_name`, default "network_train"; TensorBoard writes to
  `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<tracker name>`, wandb runs `wandb.init(project=<tracker name>,
  name=--wandb_run_name, dir=<that timestamped folder>)` after `wandb.login(key=--wandb_api_key)`;
- `--log_tracker_config FILE`: a TOML file whose `[tensorboard]` / `[wandb]` tables are extra keyword arguments of
  `SummaryWriter(...)` / `wandb.init(...)`;
- `--log_config`: the arguments, without the API keys and paths (`sanitized_config`), as TensorBoard hparams (plus
  accelerate's `hparams.yml`) and as `wandb.config`;
- scalars: TensorBoard at the step (step logs) or the epoch (epoch logs); wandb gets the same dict plus
  "global_step" and "epoch" keys, logged without a step (wandb counts rows), those two defined as hidden metrics;
- sample images: TensorBoard `sample_<i>` images at the step; wandb `sample_<i>` as `wandb.Image(image,
  caption=prompt)`, not committed, so they join the step's next row of scalars.
Difference: `--wandb_run_name` also applies when `--log_tracker_config` is given (upstream's file replaces it).
Everything here is rank 0's: other ranks construct the logger with enabled=False and log nothing.
"""

import importlib
import logging
import os
import time

import toml
import yaml

DEFAULT_TRACKER_NAME = "network_train"
TRACKER_NAMES = ("tensorboard", "wandb")
# upstream's get_sanitized_config_or_none: never in a logged config
SENSITIVE_ARGS = ("wandb_api_key", "huggingface_token")
SENSITIVE_PATH_ARGS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
                       "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")

logger = logging.getLogger(__name__)


def log_backends(args) -> tuple:
    """The backends `--log_with` asks for; without it TensorBoard when `--logging_dir` is given, as upstream."""
    log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
    return {None: (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": TRACKER_NAMES}[log_with]


def check_logging_args(args):
    """Before any model loads: what the chosen backends need, and `--log_tracker_config` readable."""
    backends = log_backends(args)
    if "tensorboard" in backends and not args.logging_dir:
        raise ValueError(f"--log_with {args.log_with} requires --logging_dir (the TensorBoard folder)")
    if "wandb" in backends:
        import_wandb(args)
    elif args.wandb_run_name or args.wandb_api_key:
        logger.warning("--wandb_run_name / --wandb_api_key have no effect without --log_with wandb or all")
    if args.log_tracker_config:
        read_tracker_config(args.log_tracker_config)


def import_wandb(args):
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise ValueError(f"--log_with {args.log_with}: wandb is not installed; install it (pip install wandb, or this "
                         "project's extra: pip install '.[wandb]') or use --log_with tensorboard") from None


def read_tracker_config(path) -> dict:
    """`--log_tracker_config`: {tracker name: init keyword arguments}; other trackers' tables are warned about."""
    if not os.path.isfile(path):
        raise ValueError(f"--log_tracker_config {path}: file not found")
    try:
        config = toml.load(path)
    except toml.TomlDecodeError as e:
        raise ValueError(f"--log_tracker_config {path}: invalid TOML ({e})") from None
    for name, value in config.items():
        if not isinstance(value, dict):
            raise ValueError(f"--log_tracker_config {path}: '{name}' is not a table; expected [tensorboard] and/or "
                             "[wandb] tables of init arguments")
        if name not in TRACKER_NAMES:
            logger.warning("--log_tracker_config %s: [%s] ignored (this port logs to tensorboard and wandb)", path,
                           name)
    return {name: config[name] for name in TRACKER_NAMES if name in config}


def sanitized_config(args):
    """`--log_config`: the arguments as loggable values (lists and other objects as strings) without API keys and
    paths, as upstream; None without the flag."""
    if not args.log_config:
        return None
    return {
        key: value if value is None or isinstance(value, (bool, str, int, float)) else f"{value}"
        for key, value in vars(args).items() if key not in SENSITIVE_ARGS + SENSITIVE_PATH_ARGS
    }


class TrainingLogger:
    """The backends of `log_backends(args)`; `check_logging_args(args)` has passed (the trainer calls it before
    loading models)."""

    def __init__(self, args, enabled: bool = True):
        self.writer = None  # TensorBoard
        self.wandb = self.wandb_run = None
        backends = log_backends(args) if enabled else ()
        if not backends:
            return
        tracker_name = args.log_tracker_name or DEFAULT_TRACKER_NAME
        init_kwargs = read_tracker_config(args.log_tracker_config) if args.log_tracker_config else {}
        config = sanitized_config(args)
        log_root = None
        if args.logging_dir:
            log_root = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
            os.makedirs(log_root, exist_ok=True)
        if "tensorboard" in backends:
            from tensorboardX import SummaryWriter

            self.log_dir = os.path.join(log_root, tracker_name)
            self.writer = SummaryWriter(self.log_dir, **init_kwargs.get("tensorboard", {}))
            if config is not None:
                hparams_name = str(time.time())  # accelerate's folder for the hparams events and hparams.yml
                self.writer.add_hparams(config, {}, name=hparams_name)
                with open(os.path.join(self.log_dir, hparams_name, "hparams.yml"), "w", encoding="utf-8") as f:
                    yaml.safe_dump(config, f)
        if "wandb" in backends:
            self.wandb = import_wandb(args)
            if args.wandb_api_key is not None:
                self.wandb.login(key=args.wandb_api_key)
            wandb_kwargs = dict(init_kwargs.get("wandb", {}))
            if args.wandb_run_name:
                wandb_kwargs["name"] = args.wandb_run_name
            if log_root is not None:
                wandb_kwargs.setdefault("dir", log_root)  # upstream sets WANDB_DIR to it
            self.wandb_run = self.wandb.init(project=tracker_name, **wandb_kwargs)
            if config is not None:
                self.wandb.config.update(config, allow_val_change=True)
            for metric in ("epoch", "val_step", "global_step"):
                self.wandb_run.define_metric(metric, hidden=True)

    def log_step(self, scalars: dict, global_step: int, epoch: int):
        """After an optimizer step (epoch: 1-based)."""
        self._log(scalars, global_step, global_step, epoch)

    def log_epoch(self, scalars: dict, global_step: int, epoch: int):
        """After an epoch (epoch: 1-based): TensorBoard puts these at step `epoch`, as upstream."""
        self._log(scalars, epoch, global_step, epoch)

    def _log(self, scalars, tensorboard_step, global_step, epoch):
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, float(value), tensorboard_step)
        if self.wandb_run is not None:
            self.wandb_run.log({**scalars, "global_step": global_step, "epoch": epoch})

    def log_images(self, samples, step: int):
        """Sample images (library.sample_images.SampleImage) as `sample_<prompt index>`."""
        for sample in samples:
            key = f"sample_{sample.prompt.index}"
            if self.writer is not None:
                self.writer.add_image(key, sample.image, step, dataformats="HWC")
            if self.wandb_run is not None:
                self.wandb_run.log({key: self.wandb.Image(sample.image, caption=sample.prompt.prompt)}, commit=False)

    def commit(self, step: int):
        """wandb: write what is not committed yet (images) as the row `step`; upstream does this at step 0, after
        --sample_at_first."""
        if self.wandb_run is not None:
            self.wandb_run.log({}, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
