"""Where a run starts counting and reading data: `--resume`, `--initial_step`, `--initial_epoch` and
`--skip_until_initial_step`, as one pure function of the run's numbers (`start_position`).

Upstream (train_network.py) and this port agree on:
- `--initial_step N` sets the step the run starts at; `--initial_epoch E` (1-based) means N = (E - 1) x steps per
  epoch; `--initial_step` wins over `--initial_epoch`, and either wins over the step saved in a `--resume` state
  (with a warning). The loop starts in epoch N // steps per epoch and stops when the step count reaches
  `--max_train_steps`, which must be larger than N.
- `--skip_until_initial_step` passes over the batches of that epoch before step N without training them (the
  batch order depends only on the seed and the epoch, so the data is the uninterrupted run's); without it the
  epoch starts at its first batch.
- the offsets do not move the LR scheduler: without `--resume` it starts at its step 0 (upstream's help says so),
  with `--resume` it continues from the state.

Where upstream's arithmetic is quirky, this port differs deliberately:
- the step count starts at N in every case. Upstream starts it at 0 without `--skip_until_initial_step` (also on a
  plain `--resume`, issues #1999, #2248), and with it at the batches left to skip in the start epoch rather than
  N (#1406), so step-named files, the sampling and saving schedules and `--max_train_steps` count from the wrong
  step.
- with `--gradient_accumulation_steps` > 1 the start epoch is N // steps per epoch; upstream divides the number
  of batches by the steps per epoch, which starts gradient_accumulation_steps times too late and can skip the
  whole run (#2407).
- `--initial_epoch` counts this process's steps per epoch; upstream divides the (already per-process) batch count
  by the number of processes a second time.
- a plain `--resume` always continues at the saved batch (library/train_state.py), so `--skip_until_initial_step`
  changes nothing there (upstream needs it to skip at all).
- skipped batches draw no noise: with `--resume` the noise stream is the state's, without it the first trained
  step's noise is the seed's first draw, not the uninterrupted run's.
- the progress bar shows N of `--max_train_steps` done (upstream's counts the steps left from 0).
The loop (train_network.py) also starts mindone's gradient-accumulation counter at the skipped batches, so an
epoch whose batches do not divide by the accumulation still ends with its short step.
"""

import logging
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartPosition:
    global_step: int  # optimizer steps counted as done: step numbers and --max_train_steps continue from it
    first_epoch: int  # 0-based epoch the loop starts in
    skip_batches: int  # batches of first_epoch (this process's) passed over without training


def start_position(*, num_batches_per_epoch: int, gradient_accumulation_steps: int, max_train_steps: int,
                   initial_step: Optional[int] = None, initial_epoch: Optional[int] = None,
                   skip_until_initial_step: bool = False, resumed_step: Optional[int] = None) -> StartPosition:
    """`num_batches_per_epoch`: this process's batches per epoch; `resumed_step`: the step of a `--resume` state
    (None without one); the flags' signs are checked by `check_offset_args`. ValueError naming the flag when the
    start is not before `max_train_steps`."""
    steps_per_epoch = -(-num_batches_per_epoch // gradient_accumulation_steps)  # the last step may take fewer batches
    if initial_step is not None or initial_epoch is not None:
        if initial_step is not None:
            step, source = initial_step, f"--initial_step {initial_step}"
        else:
            step = (initial_epoch - 1) * steps_per_epoch
            source = f"--initial_epoch {initial_epoch} (step {step})"
        skip = skip_until_initial_step
    elif resumed_step is not None:
        step, source, skip = resumed_step, f"--resume: the state's step {resumed_step}", True
    else:
        return StartPosition(0, 0, 0)
    if step > 0 and step >= max_train_steps:
        raise ValueError(f"{source} must be less than --max_train_steps {max_train_steps}: nothing left to train")
    first_epoch = step // steps_per_epoch
    skip_batches = (step - first_epoch * steps_per_epoch) * gradient_accumulation_steps if skip else 0
    return StartPosition(step, first_epoch, skip_batches)


def check_offset_args(args):
    """Before any model loads: the flags' signs, and what the combination with `--resume` means."""
    if args.initial_step is not None and args.initial_step < 0:
        raise ValueError(f"--initial_step must be >= 0, got {args.initial_step}")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        raise ValueError(f"--initial_epoch must be >= 1 (1 is the first epoch), got {args.initial_epoch}")
    offset_given = args.initial_step is not None or args.initial_epoch is not None
    if offset_given and args.resume:
        logger.warning("--initial_step / --initial_epoch given: the step saved in the --resume state is ignored (as "
                       "upstream); the optimizer, LR scheduler and noise stream still continue from the state")
    if args.skip_until_initial_step and not offset_given:
        why = " (--resume always continues at the saved batch)" if args.resume else ""
        logger.warning("--skip_until_initial_step has no effect without --initial_step / --initial_epoch%s", why)
