"""Scalar and sample-image logging for `--log_with tensorboard` (tensorboardX), with upstream's directory layout and tag names."""

import os
import time


class TrainingLogger:
    """Writes to `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train` as accelerate's tracker does upstream.

    Logging is on when `--logging_dir` is given and `--log_with` is tensorboard (or unset, as upstream
    defaults to tensorboard when a logging dir is set). wandb is not available in this port.
    """

    def __init__(self, args, enabled: bool = True):
        self.writer = None
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        if log_with in ("wandb", "all"):
            raise ValueError("--log_with wandb: wandb is not supported by this port; use --log_with tensorboard")
        if not enabled or log_with is None:
            return
        if args.logging_dir is None:
            raise ValueError("--log_with tensorboard requires --logging_dir")
        from tensorboardX import SummaryWriter

        run_name = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
        self.log_dir = os.path.join(args.logging_dir, run_name, args.log_tracker_name or "network_train")
        self.writer = SummaryWriter(self.log_dir)

    def log(self, scalars: dict, step: int):
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)

    def log_images(self, samples, step: int):
        """Sample images (library.sample_images.SampleImage) as `sample_<prompt index>`, upstream's wandb keys."""
        if self.writer is None:
            return
        for sample in samples:
            self.writer.add_image(f"sample_{sample.prompt.index}", sample.image, step, dataformats="HWC")

    def close(self):
        if self.writer is not None:
            self.writer.close()
