"""--initial_step / --initial_epoch / --skip_until_initial_step and --resume: where a run starts counting and
reading data (library/step_offsets.py), against a transcription of upstream's arithmetic and a model of the loop,
plus a tiny real run that checks the logged and saved step numbers."""

import json
import logging
import math
import os
import signal
import sys

import numpy as np
import pytest
from safetensors import safe_open

from library.step_offsets import StartPosition, check_offset_args, start_position
from test_training_logger import FakeWandb, tensorboard_scalars
from train_helpers import write_training_workspace


def upstream_start(*, batches, ga, initial_step=None, initial_epoch=None, skip=False, state_step=None, processes=1):
    """Upstream train_network.py's numbers, transcribed: (global_step it starts with, epoch_to_start, batches of
    that epoch skipped). `batches`: len(train_dataloader) after accelerator.prepare (per process)."""
    steps_per_epoch = math.ceil(batches / ga)
    initial = 0
    if initial_epoch is not None or initial_step is not None:
        if initial_step is not None:
            initial = initial_step
        else:
            initial = (initial_epoch - 1) * math.ceil(batches / processes / ga)
    elif state_step is not None:
        initial = state_step
    epoch_to_start = 0
    if initial > 0:
        if skip:
            initial *= ga
            epoch_to_start = initial // steps_per_epoch
        else:
            epoch_to_start = initial // steps_per_epoch
            initial = 0
    global_step = 0
    if initial > 0:
        for _ in range(epoch_to_start):
            initial -= batches
        global_step = initial
    return global_step, epoch_to_start, max(initial, 0)


def ours(*, batches, ga, initial_step=None, initial_epoch=None, skip=False, state_step=None, max_steps=100):
    start = start_position(num_batches_per_epoch=batches, gradient_accumulation_steps=ga, max_train_steps=max_steps,
                           initial_step=initial_step, initial_epoch=initial_epoch, skip_until_initial_step=skip,
                           resumed_step=state_step)
    return start.global_step, start.first_epoch, start.skip_batches


# (flags, ours, upstream's): where the two differ, upstream's numbers are its known quirks (library/step_offsets.py)
CASES = [
    (dict(batches=4, ga=1), (0, 0, 0), (0, 0, 0)),
    (dict(batches=4, ga=1, initial_step=0, skip=True), (0, 0, 0), (0, 0, 0)),
    # inside the first epoch, no accumulation: the same
    (dict(batches=4, ga=1, initial_step=3, skip=True), (3, 0, 3), (3, 0, 3)),
    (dict(batches=4, ga=1, initial_step=2, skip=True, state_step=6), (2, 0, 2), (2, 0, 2)),  # the flag wins
    # a later epoch: upstream counts from the batches left to skip (#1406)
    (dict(batches=4, ga=1, initial_step=6, skip=True), (6, 1, 2), (2, 1, 2)),
    (dict(batches=4, ga=1, initial_epoch=3, skip=True), (8, 2, 0), (0, 2, 0)),
    # without --skip_until_initial_step: same epoch, from its first batch; upstream counts from 0
    (dict(batches=4, ga=1, initial_step=6), (6, 1, 0), (0, 1, 0)),
    (dict(batches=4, ga=1, initial_epoch=2), (4, 1, 0), (0, 1, 0)),
    # --resume: ours always continues at the saved batch; upstream only with --skip_until_initial_step
    (dict(batches=4, ga=1, state_step=6), (6, 1, 2), (0, 1, 0)),
    (dict(batches=4, ga=1, state_step=6, skip=True), (6, 1, 2), (2, 1, 2)),
    (dict(batches=4, ga=1, state_step=3, skip=True), (3, 0, 3), (3, 0, 3)),
    # gradient accumulation: upstream's start epoch is ga times too late (#2407), the count goes negative
    (dict(batches=10, ga=2, initial_step=3, skip=True), (3, 0, 6), (-4, 1, 0)),
    (dict(batches=10, ga=2, initial_step=7, skip=True), (7, 1, 4), (-6, 2, 0)),
    (dict(batches=10, ga=2, initial_step=7), (7, 1, 0), (0, 1, 0)),
    (dict(batches=10, ga=3, initial_step=5, skip=True), (5, 1, 3), (-15, 3, 0)),  # 4 steps/epoch: 3+3+3+1 batches
    (dict(batches=10, ga=2, state_step=7), (7, 1, 4), (0, 1, 0)),
]


@pytest.mark.parametrize("flags, expected, expected_upstream", CASES)
def test_start_position_against_upstream(flags, expected, expected_upstream):
    assert ours(**flags) == expected
    assert upstream_start(**flags) == expected_upstream


def test_initial_epoch_counts_this_process_steps():
    # 2 processes, 4 batches each (len(train_dataloader) after prepare), ga 1: epoch 3 starts at step 8;
    # upstream divides the per-process count by the processes again: step 4, which starts epoch 2 (at step 0)
    assert ours(batches=4, ga=1, initial_epoch=3, skip=True) == (8, 2, 0)
    assert upstream_start(batches=4, ga=1, initial_epoch=3, skip=True, processes=2) == (0, 1, 0)


def loop_steps(start: StartPosition, batches: int, ga: int, max_steps: int):
    """(step number, epoch, batch indices) of each optimizer step the loop in train_network.py runs from `start`:
    skip, then a step every `ga` batches and at the epoch's end (mindone's accumulator, its index at the skip)."""
    steps, step, skip = [], start.global_step, start.skip_batches
    for epoch in range(start.first_epoch, math.ceil(max_steps / math.ceil(batches / ga))):
        pending = []
        for batch in range(batches):
            if skip:
                skip -= 1
                continue
            pending.append(batch)
            if (batch + 1) % ga == 0 or batch + 1 == batches:
                step += 1
                steps.append((step, epoch, tuple(pending)))
                pending = []
                if step >= max_steps:
                    return steps
    return steps


@pytest.mark.parametrize("batches, ga", [(4, 1), (5, 2), (10, 3), (3, 2)])
def test_skipping_trains_what_the_uninterrupted_run_trains_next(batches, ga):
    max_steps = 3 * math.ceil(batches / ga) + 1
    full = loop_steps(StartPosition(0, 0, 0), batches, ga, max_steps)
    assert [s[0] for s in full] == list(range(1, max_steps + 1))
    for n in range(max_steps):
        for flags in (dict(initial_step=n, skip=True), dict(state_step=n)):
            start = StartPosition(*ours(batches=batches, ga=ga, max_steps=max_steps, **flags))
            assert loop_steps(start, batches, ga, max_steps) == full[n:], (n, flags)
        # without skipping: the data from the first batch of step n's epoch on, counted from n, up to max_steps
        start = StartPosition(*ours(batches=batches, ga=ga, max_steps=max_steps, initial_step=n))
        steps = loop_steps(start, batches, ga, max_steps)
        assert [s[0] for s in steps] == list(range(n + 1, max_steps + 1))
        epoch_start = next(i for i, s in enumerate(full) if s[1] == start.first_epoch)
        assert [s[1:] for s in steps] == [s[1:] for s in full[epoch_start:epoch_start + len(steps)]]


@pytest.mark.parametrize("flags, message", [
    (dict(initial_step=8), "--initial_step 8 must be less than --max_train_steps 8: nothing left to train"),
    (dict(initial_epoch=3), r"--initial_epoch 3 \(step 8\) must be less than --max_train_steps 8"),
    (dict(state_step=8), "--resume: the state's step 8 must be less than --max_train_steps 8"),
])
def test_a_start_at_or_after_max_train_steps_is_an_error(flags, message):
    with pytest.raises(ValueError, match=message):
        ours(batches=4, ga=1, max_steps=8, **flags)


class Args:
    def __init__(self, initial_step=None, initial_epoch=None, skip_until_initial_step=False, resume=None):
        self.initial_step, self.initial_epoch = initial_step, initial_epoch
        self.skip_until_initial_step, self.resume = skip_until_initial_step, resume


def test_flag_checks_and_warnings(caplog):
    with pytest.raises(ValueError, match=r"^--initial_step must be >= 0, got -1$"):
        check_offset_args(Args(initial_step=-1))
    with pytest.raises(ValueError, match=r"^--initial_epoch must be >= 1 \(1 is the first epoch\), got 0$"):
        check_offset_args(Args(initial_epoch=0))
    with caplog.at_level(logging.WARNING, logger="library.step_offsets"):
        check_offset_args(Args(initial_step=3, skip_until_initial_step=True))
        assert caplog.messages == []
        check_offset_args(Args(initial_step=3, resume="state"))
        check_offset_args(Args(skip_until_initial_step=True))
        check_offset_args(Args(skip_until_initial_step=True, resume="state"))
    assert [m.split(":")[0].split(" has")[0] for m in caplog.messages] == [
        "--initial_step / --initial_epoch given", "--skip_until_initial_step", "--skip_until_initial_step"]
    assert "step saved in the --resume state is ignored" in caplog.messages[0]
    assert caplog.messages[2].endswith("(--resume always continues at the saved batch)")


def test_accumulator_index_set_at_the_skip_steps_at_the_epoch_end():
    """The loop starts mindone's accumulation counter at the skipped batches (what loop_steps assumes): with 3
    batches per epoch and accumulation 2, a run that skipped 2 batches steps after the third, the epoch's last."""
    import mindspore as ms
    from mindone.diffusers.training_utils import TrainStep
    from mindspore import nn, ops

    class SumStep(TrainStep):
        def forward(self, x):
            return (self.scale_loss(ops.sum(self.model(x))),)

    def steps_taken(skipped_batches):
        net = nn.Dense(2, 1)
        step = SumStep(net, nn.SGD(net.trainable_params(), 0.1), gradient_accumulation_steps=2,
                       gradient_accumulation_kwargs={"length_of_dataloader": 3})
        if skipped_batches:
            step.grad_accumulator.batch_idx.set_data(ms.Tensor(skipped_batches, ms.int64))  # as train_network.py
        taken = []
        for _ in range(4):
            step(ms.Tensor(np.ones((1, 2), np.float32)))
            taken.append(bool(step.sync_gradients.asnumpy()))
        return taken

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)  # accumulation has no PyNative CPU kernels
    try:
        assert steps_taken(0) == [False, True, True, False]  # batches 0 1 | 2 | 0 ...
        assert steps_taken(2) == [True, False, True, True]  # batch 2 | 0 1 | 2
    finally:
        ms.set_context(mode=mode)


# ----- a tiny real run: 3 images, batch 1 -> 3 steps per epoch ---------------------------------------------------


@pytest.mark.slow
def test_initial_step_run_logs_and_saves_its_step_numbers_and_stops_on_ctrl_c(tmp_path, monkeypatch):
    import sdxl_train_network

    ckpt, data_dir = write_training_workspace(tmp_path, num_images=3, num_repeats=1)
    out = tmp_path / "out"
    # Ctrl-C arrives while step 5 is logged: the run stops after it (library/interrupts.py)
    fake = FakeWandb(on_log=lambda values: values.get("global_step") == 5 and os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = sdxl_train_network.setup_parser().parse_args([
        "--pretrained_model_name_or_path", ckpt, "--train_data_dir", data_dir, "--resolution", "64",
        "--caption_extension", ".txt", "--network_module", "networks.lora", "--network_dim", "4",
        "--network_alpha", "2", "--output_dir", str(out), "--output_name", "lora", "--seed", "3",
        "--learning_rate", "1e-3", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
        "--max_train_steps", "6", "--save_every_n_steps", "2", "--save_state", "--logging_dir", str(out / "logs"),
        "--log_with", "all", "--initial_step", "2", "--skip_until_initial_step",
    ])
    with pytest.raises(SystemExit) as stopped:
        sdxl_train_network.SdxlNetworkTrainer().train(args)
    assert stopped.value.code == 130

    # epoch 1 skips its first two batches (steps 1 and 2) and trains the third as step 3; epoch 2 starts at step 4
    rows = [(values["global_step"], values["epoch"]) for values in fake.logged() if "loss/current" in values]
    assert rows == [(3, 1), (4, 2), (5, 2)]
    assert [(values["global_step"], values["epoch"]) for values in fake.logged() if "loss/epoch_average" in values] \
        == [(3, 1)]
    assert sorted(tensorboard_scalars(out, "loss/current")) == [3, 4, 5]
    assert sorted(tensorboard_scalars(out, "loss/epoch_average")) == [1]
    assert fake.calls[-1] == ("finish",)  # the wandb run was finished before the exit
    # step files counted from --initial_step: every 2 steps (step 4), and the Ctrl-C save after step 5
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == [
        "lora-step00000004.safetensors", "lora-step00000005.safetensors"]
    for step in (4, 5):
        with safe_open(str(out / f"lora-step{step:08d}.safetensors"), framework="np") as f:
            assert f.metadata()["ss_steps"] == str(step)
        state = json.loads((out / f"lora-step{step:08d}-state" / "train_state.json").read_text())
        assert state["current_step"] == step
