"""Validation loss, as Kohya's `--validation_split` runs it: the trained network evaluated on held-out images.

Upstream (train_network.py, PR #1903) evaluates each validation batch at a fixed list of timesteps
(`validation_timesteps`: 200, 400, 600, 800 by default) with noise from a generator reseeded with the validation
seed at every evaluation, in eval mode, with no gradient, so that two evaluations of the same weights give the
same loss. Here:

- the images: `config_util.build_dataset_groups` returns `(train_group, validation_group or None)`; the split is
  `datasets.split_train_val`. Cache the validation group's latents (and text-encoder outputs) as the training
  group's; with cached latents the loss is exactly repeatable (uncached, the VAE posterior sample is drawn
  inside the graph, fresh each call);
- the noise: `noise_sampling.FixedTimestepNoise`, the train step's draws with the timestep fixed, a function of
  (validation seed, batch index, timestep) that touches no other random stream;
- the graph: `ValidationStep`, the train step's `forward` alone (no backward, no optimizer), compiled once for
  every bucket by `compile_validation_step`; with masked loss the validation batches carry their masks
  (`alpha_masks`) as the training batches do, and that forward applies them, as upstream's shared
  `process_batch` does;
- the schedule: `should_validate_step` / `should_validate_epoch`; the logged values: `ValidationLossTracker`.

`Validation` puts these together for the training loop:

    validator = validation.Validation.create(args, train_step, val_group, network, rank=..., world_size=...,
                                             optimizer_eval_fn=..., optimizer_train_fn=...)  # None: no validation
    ... after each optimizer step (global_step incremented, step logs written):
        logs = validator.after_step(global_step, epoch, loss_recorder.moving_average)
        if logs: tracker.log_step(logs, global_step, epoch + 1)
    ... after each epoch's steps, before "loss/epoch_average":
        logs = validator.after_epoch(epoch, loss_recorder.moving_average)
        if logs: tracker.log_epoch(logs, global_step, epoch + 1)
"""

import argparse
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mindspore as ms
import numpy as np
from tqdm import tqdm

from library.custom_train_functions import NUM_TRAIN_TIMESTEPS
from library.graph_compile import CompiledStep
from library.graph_reuse import GraphEntry, eval_mode
from library.noise_sampling import FixedTimestepNoise

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4  # upstream's constant: 200, 400, 600, 800 for the full range

# the dataset epoch and step the validation group is evaluated at, always (see freeze_validation_group)
VALIDATION_EPOCH = 1


# ----- arguments ---------------------------------------------------------------------------------------------


def add_validation_arguments(parser: argparse.ArgumentParser):
    """Upstream's validation flags (train_network.setup_parser), with its defaults."""
    parser.add_argument("--validation_seed", type=int, default=None,
                        help="validation seed for shuffling the validation dataset, training `--seed` used otherwise")
    parser.add_argument("--validation_split", type=float, default=0.0,
                        help="split for validation images out of the training dataset")
    parser.add_argument("--validate_every_n_steps", type=int, default=None,
                        help="run validation on the validation dataset every N steps. By default, validation only "
                        "occurs every epoch if a validation dataset is available")
    parser.add_argument("--validate_every_n_epochs", type=int, default=None,
                        help="run validation on the validation dataset every N epochs. By default, validation runs "
                        "every epoch if a validation dataset is available")
    parser.add_argument("--max_validation_steps", type=int, default=None,
                        help="max number of validation dataset items (batches) processed. By default, validation runs "
                        "the entire validation dataset")


def verify_validation_args(args):
    """Errors for values upstream crashes on (a modulo by zero) or runs to no purpose; call before models load."""
    split = getattr(args, "validation_split", 0.0) or 0.0
    if not 0.0 <= split <= 1.0:
        raise ValueError(f"--validation_split must be between 0 and 1; got {split}")
    for flag in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            off = "; use --validation_split 0 (the default) for no validation" if flag == "max_validation_steps" else ""
            raise ValueError(f"--{flag} must be at least 1 when given; got {value}{off}")


def validation_seed(args) -> int:
    """The seed of the validation noise: --validation_seed, else --seed (upstream's switch_rng_state argument)."""
    seed = getattr(args, "validation_seed", None)
    if seed is None:
        seed = args.seed
    if seed is None:
        raise ValueError("validation needs a seed: set --seed or --validation_seed")
    return int(seed)


def validation_timesteps(args, num_timesteps: int = NUM_VALIDATION_TIMESTEPS) -> List[int]:
    """Upstream's fixed timesteps: the inner points of linspace(min_timestep, max_timestep, n + 2), as ints."""
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = NUM_TRAIN_TIMESTEPS if args.max_timestep is None else args.max_timestep
    return [int(t) for t in np.linspace(min_timestep, max_timestep, num_timesteps + 2, dtype=int)[1:-1]]


def validation_metadata(args, validation_group) -> dict:
    """The ss_* validation keys of a saved LoRA, as upstream writes them (the flags as given; strings)."""
    values = {
        "ss_num_validation_images": validation_group.num_train_images if validation_group is not None else 0,
        "ss_validation_seed": getattr(args, "validation_seed", None),
        "ss_validation_split": getattr(args, "validation_split", 0.0),
        "ss_max_validation_steps": getattr(args, "max_validation_steps", None),
        "ss_validate_every_n_epochs": getattr(args, "validate_every_n_epochs", None),
        "ss_validate_every_n_steps": getattr(args, "validate_every_n_steps", None),
    }
    return {key: str(value) for key, value in values.items()}


# ----- schedule ----------------------------------------------------------------------------------------------


def num_validation_steps(num_batches: int, max_validation_steps: Optional[int]) -> int:
    """Batches one evaluation runs: all of this rank's, or at most --max_validation_steps."""
    return num_batches if max_validation_steps is None else min(max_validation_steps, num_batches)


def should_validate_step(global_step: int, validate_every_n_steps: Optional[int], num_steps: int) -> bool:
    """Upstream's step validation: only with --validate_every_n_steps, at steps N, 2N, ... (global_step already
    counts the step just taken; the trainer asks only after an optimizer step, not between accumulated batches)."""
    return num_steps > 0 and validate_every_n_steps is not None and global_step % validate_every_n_steps == 0


def should_validate_epoch(epoch: int, validate_every_n_epochs: Optional[int], num_steps: int) -> bool:
    """Upstream's epoch validation: after every epoch, or after epochs N, 2N, ... with --validate_every_n_epochs.
    `epoch` is the loop's 0-based index (epoch + 1 is the epoch just finished)."""
    if num_steps <= 0:
        return False
    return True if validate_every_n_epochs is None else (epoch + 1) % validate_every_n_epochs == 0


def should_validate(step: Optional[int] = None, epoch: Optional[int] = None, *, validate_every_n_steps=None,
                    validate_every_n_epochs=None, num_steps: int = 1) -> bool:
    """`should_validate_step(step, ...)` when `step` is given, else `should_validate_epoch(epoch, ...)`."""
    if (step is None) == (epoch is None):
        raise ValueError("give either step (after an optimizer step) or epoch (at the end of an epoch)")
    if step is not None:
        return should_validate_step(step, validate_every_n_steps, num_steps)
    return should_validate_epoch(epoch, validate_every_n_epochs, num_steps)


# ----- logged values -----------------------------------------------------------------------------------------


class UpstreamLossRecorder:
    """Upstream's `train_util.LossRecorder`, which its validation averages use: in epoch 0 every loss is appended;
    in later epochs loss number `step` overwrites slot `step` (slots beyond the current run keep older losses).

    (library.train_util.LossRecorder, the training average, overwrites by slot in every epoch instead.)"""

    def __init__(self):
        self.loss_list: List[float] = []
        self.loss_total = 0.0

    def add(self, epoch: int, step: int, loss: float):
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list) if self.loss_list else 0.0


class ValidationLossTracker:
    """The values upstream logs after an evaluation, from its losses (one per batch and timestep, in order).

    Step evaluations log `loss/validation/step_average` and `loss/validation/step_divergence` (at global_step);
    epoch evaluations `loss/validation/epoch_average` and `loss/validation/epoch_divergence` (at epoch + 1).
    The averages are upstream's recorders over all evaluations so far (see UpstreamLossRecorder: step
    evaluations in the first epoch accumulate); a divergence is that average minus the training loss's moving
    average at the time. Upstream's per-loss `step_current` / `epoch_current` tags are commented out there and
    not logged; the mean of one evaluation is `ValidationResult.mean`."""

    def __init__(self):
        self.step_recorder = UpstreamLossRecorder()
        self.epoch_recorder = UpstreamLossRecorder()

    def step_logs(self, losses: Sequence[float], epoch: int, train_average: float) -> dict:
        for i, loss in enumerate(losses):
            self.step_recorder.add(epoch, i, float(loss))
        average = self.step_recorder.moving_average
        return {"loss/validation/step_average": average, "loss/validation/step_divergence": average - train_average}

    def epoch_logs(self, losses: Sequence[float], epoch: int, train_average: float) -> dict:
        for i, loss in enumerate(losses):
            self.epoch_recorder.add(epoch, i, float(loss))
        average = self.epoch_recorder.moving_average
        return {"loss/validation/epoch_average": average, "loss/validation/epoch_divergence": average - train_average}


# ----- the graph ---------------------------------------------------------------------------------------------


class ValidationStep(GraphEntry):
    """The train step's forward pass as a graph of its own: inputs as the train step's (batch tuple, then the
    noise draws), output `(unscaled loss,)` (a tuple, as CompiledStep expects). No gradient, no optimizer
    update, no loss-scale change.

    It shares every cell and parameter with the train step (nothing is copied; parameter names are kept). The
    network's dropouts are decided when it compiles: compile and call it with the network in eval mode
    (`run_validation` does)."""

    def __init__(self, train_step):
        super().__init__(auto_prefix=False)  # a prefix would rename the train step's (shared) parameters
        self.train_step = train_step
        self.shares_repeated_blocks = True  # no control flow around the blocks here (see library/graph_reuse.py)

    def construct(self, *inputs):
        return (self.train_step.forward(*inputs)[1],)


def compile_validation_step(train_step, batch_fields: Sequence[str], noise_per_sample: Sequence[bool],
                            static_shapes: bool = False) -> CompiledStep:
    """`ValidationStep(train_step)` behind a `CompiledStep` declared as the trainer declares the train step, so one
    graph serves every bucket (or one per shape with --static_shapes). It stays out of the compile cache: a
    process caches one graph only, and that is the train step's."""
    return CompiledStep(
        ValidationStep(train_step), per_sample=(True,) * len(batch_fields) + tuple(noise_per_sample),
        description="the validation step", static_shapes=static_shapes, compile_cache_dir=None,
    )


# ----- an evaluation -----------------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    losses: List[float] = field(default_factory=list)  # per batch, then per timestep (upstream's order)

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


def freeze_validation_group(group, max_train_steps: int):
    """Fix what the validation batches depend on besides their index: the dataset epoch (batch order, flips,
    caption shuffles and dropouts) and the step (token warmup, taken as finished: whole captions), so every
    evaluation sees the same batches. Upstream never sets its validation group's epoch in the main process."""
    group.set_current_epoch(VALIDATION_EPOCH)
    group.set_max_train_steps(max_train_steps)
    group.set_current_step(max_train_steps)


def validation_batch_indices(num_batches: int, max_steps: Optional[int], rank: int = 0, world_size: int = 1):
    """This rank's validation batches: rank, rank + N, ... (upstream's sharded dataloader), at most max_steps.
    Without an all-reduce here, ranks may run different counts, and a rank may have none."""
    indices = range(rank, num_batches, world_size)
    return indices[: num_validation_steps(len(indices), max_steps)]


def run_validation(validation_step, validation_group, noise: FixedTimestepNoise, timesteps: Sequence[int], network,
                   max_steps: Optional[int] = None, rank: int = 0, world_size: int = 1,
                   show_progress: bool = False, description: str = "validation steps") -> ValidationResult:
    """Evaluate the validation batches of this rank (at most `max_steps`) at each timestep, with the network in
    eval mode (LoRA dropouts off), restored afterwards. `validation_step` is the compiled ValidationStep; its
    losses come back in upstream's order."""
    indices = validation_batch_indices(len(validation_group), max_steps, rank, world_size)
    result = ValidationResult()
    progress = tqdm(total=len(indices) * len(timesteps), desc=description, smoothing=0, leave=False,
                    disable=not show_progress)
    with eval_mode([network]), progress:
        for index in indices:
            batch, _ = validation_group.get_batch(index)
            shape = validation_group.latent_shape(batch)
            batch_tensors = tuple(ms.Tensor(a) for a in batch)
            for timestep in timesteps:
                draws = noise.draw(shape, index, timestep)
                loss = validation_step(*batch_tensors, *(ms.Tensor(a) for a in draws))[0]
                result.losses.append(float(loss.asnumpy()))
                progress.update(1)
                progress.set_postfix(val_avg_loss=f"{result.mean:.4f}", timestep=timestep)
    return result


# ----- everything, for the training loop ---------------------------------------------------------------------


class Validation:
    """The validation pieces of one training run; `create` returns None when there is nothing to validate.

    `optimizer_eval_fn` / `optimizer_train_fn` (optimizers.get_optimizer_train_eval_fn) are called around each
    evaluation as upstream does, for schedule-free optimizers (no-ops otherwise)."""

    def __init__(self, args, train_step, validation_group, network, rank: int = 0, world_size: int = 1,
                 show_progress: bool = True, optimizer_eval_fn=None, optimizer_train_fn=None):
        if validation_group.with_masks != getattr(train_step, "masked_loss", False):
            raise ValueError("the validation batches and the train step disagree on masked loss (alpha_masks)")
        self.group = validation_group
        self.network = network
        self.rank, self.world_size = rank, world_size
        self.show_progress = show_progress
        self.optimizer_eval_fn = optimizer_eval_fn or (lambda: None)
        self.optimizer_train_fn = optimizer_train_fn or (lambda: None)
        self.validate_every_n_steps = args.validate_every_n_steps
        self.validate_every_n_epochs = args.validate_every_n_epochs
        self.max_steps = args.max_validation_steps
        self.max_train_steps = args.max_train_steps
        self.noise = FixedTimestepNoise(args, validation_seed(args))
        self.timesteps = validation_timesteps(args)
        self.step = compile_validation_step(train_step, validation_group.batch_fields, self.noise.per_sample,
                                            static_shapes=bool(getattr(args, "static_shapes", False)))
        self.tracker = ValidationLossTracker()
        self.num_steps = len(validation_batch_indices(len(validation_group), self.max_steps, rank, world_size))

    @classmethod
    def create(cls, args, train_step, validation_group, network, rank: int = 0, world_size: int = 1,
               show_progress: bool = True, optimizer_eval_fn=None, optimizer_train_fn=None) -> Optional["Validation"]:
        """Build after the train step (its cells are shared) and after `args.max_train_steps` is final. Nothing
        compiles here: the validation graph compiles on the first evaluation."""
        if validation_group is None or len(validation_group) == 0:
            return None
        return cls(args, train_step, validation_group, network, rank, world_size, show_progress,
                   optimizer_eval_fn, optimizer_train_fn)

    def run(self, description: str = "validation steps") -> ValidationResult:
        """One evaluation of the current weights (every call gives the same losses for the same weights)."""
        freeze_validation_group(self.group, self.max_train_steps)
        self.optimizer_eval_fn()
        try:
            return run_validation(self.step, self.group, self.noise, self.timesteps, self.network, self.max_steps,
                                  self.rank, self.world_size, self.show_progress, description)
        finally:
            self.optimizer_train_fn()

    def after_step(self, global_step: int, epoch: int, train_average: float) -> Optional[dict]:
        """After an optimizer step: the step logs (for tracker.log_step) when one is due, else None.
        `epoch` is the loop's 0-based index; `train_average` the training loss_recorder.moving_average."""
        if not should_validate_step(global_step, self.validate_every_n_steps, self.num_steps):
            return None
        return self.tracker.step_logs(self.run("validation steps").losses, epoch, train_average)

    def after_epoch(self, epoch: int, train_average: float) -> Optional[dict]:
        """After an epoch's steps (0-based `epoch`): the epoch logs (for tracker.log_epoch) when due."""
        if not should_validate_epoch(epoch, self.validate_every_n_epochs, self.num_steps):
            return None
        return self.tracker.epoch_logs(self.run("epoch validation steps").losses, epoch, train_average)
