"""--log_with tensorboard|wandb|all and the tracker flags (library/training_logger.py), with a fake `wandb` module
that records its calls: nothing goes to the network."""

import glob
import os
import re
import sys
import types

import numpy as np
import pytest
import yaml

import sdxl_train_network
from library.sample_images import SampleImage
from library.sample_prompts import SamplePrompt
from library.training_logger import TrainingLogger, check_logging_args, read_tracker_config
from train_helpers import tensorboard_events


class FakeWandb(types.ModuleType):
    """Stands in for `wandb` in sys.modules: records login, init, config.update and the run's calls in order;
    `on_log(values)` runs after each run.log."""

    class Image:
        def __init__(self, data, caption=None):
            self.data, self.caption = data, caption

    def __init__(self, on_log=None):
        super().__init__("wandb")
        self.calls = []
        self.on_log = on_log
        self.config = types.SimpleNamespace(
            update=lambda values, **kwargs: self.calls.append(("config.update", values, kwargs)))

    def login(self, **kwargs):
        self.calls.append(("login", kwargs))

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return FakeRun(self)

    def logged(self):
        return [call[1] for call in self.calls if call[0] == "log"]


class FakeRun:
    def __init__(self, wandb):
        self.wandb = wandb

    def log(self, values, step=None, commit=None):
        self.wandb.calls.append(("log", values, {"step": step, "commit": commit}))
        if self.wandb.on_log:
            self.wandb.on_log(values)

    def define_metric(self, name, **kwargs):
        self.wandb.calls.append(("define_metric", name, kwargs))

    def finish(self):
        self.wandb.calls.append(("finish",))


def tensorboard_scalars(output_dir, tag):
    """{step: value} of `tag` in the one TensorBoard event file under `<output_dir>/logs`."""
    return {event.step: v.simple_value for event in tensorboard_events(output_dir) for v in event.summary.value
            if v.tag == tag}


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def parse(*flags):
    return sdxl_train_network.setup_parser().parse_args(list(flags))


def sample(index, prompt, seed):
    image = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    return SampleImage("unused.png", image, SamplePrompt(prompt=prompt, index=index), seed, "ddim")


def test_all_logs_scalars_and_images_to_tensorboard_and_wandb(tmp_path, fake_wandb):
    args = parse("--logging_dir", str(tmp_path / "logs"), "--log_with", "all", "--log_prefix", "pre_",
                 "--wandb_run_name", "first try", "--wandb_api_key", "SECRET")
    check_logging_args(args)
    tracker = TrainingLogger(args)
    (run_dir,) = glob.glob(str(tmp_path / "logs" / "pre_*"))
    assert re.fullmatch(r"pre_\d{14}", os.path.basename(run_dir))
    assert tracker.log_dir == os.path.join(run_dir, "network_train")
    samples = [sample(0, "a cat", 1), sample(2, "a dog", 2)]
    tracker.commit(0)
    tracker.log_images(samples, 3)
    tracker.log_step({"loss/current": 0.5, "lr/unet": 1e-4}, 3, 1)
    tracker.log_epoch({"loss/epoch_average": 0.25}, 4, 2)
    tracker.close()
    tracker.close()  # a second close (an error path closes early) changes nothing

    calls = fake_wandb.calls
    assert calls[:2] == [("login", {"key": "SECRET"}),
                         ("init", {"project": "network_train", "name": "first try", "dir": run_dir})]
    assert calls[2:5] == [("define_metric", name, {"hidden": True}) for name in ("epoch", "val_step", "global_step")]
    assert calls[5] == ("log", {}, {"step": 0, "commit": None})
    for call, original in zip(calls[6:8], samples):  # not committed: they join the step's row
        (key, image), = call[1].items()
        assert key == f"sample_{original.prompt.index}" and call[2] == {"step": None, "commit": False}
        assert image.caption == original.prompt.prompt and image.data is original.image
    assert calls[8:] == [
        ("log", {"loss/current": 0.5, "lr/unet": 1e-4, "global_step": 3, "epoch": 1}, {"step": None, "commit": None}),
        ("log", {"loss/epoch_average": 0.25, "global_step": 4, "epoch": 2}, {"step": None, "commit": None}),
        ("finish",),
    ]

    # TensorBoard: step logs at the step, epoch logs at the epoch, images as sample_<i> at the step
    assert tensorboard_scalars(tmp_path, "loss/current") == {3: 0.5}
    assert tensorboard_scalars(tmp_path, "lr/unet") == {3: pytest.approx(1e-4)}
    assert tensorboard_scalars(tmp_path, "loss/epoch_average") == {2: 0.25}
    images = {(v.tag, event.step): (v.image.height, v.image.width)
              for event in tensorboard_events(tmp_path) for v in event.summary.value if v.HasField("image")}
    assert images == {("sample_0", 3): (32, 48), ("sample_2", 3): (32, 48)}


def test_log_config_and_tracker_config(tmp_path, fake_wandb):
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text('[wandb]\nentity = "team"\ntags = ["sdxl"]\nname = "from the file"\n\n'
                              '[tensorboard]\nflush_secs = 7\n')
    args = parse("--logging_dir", str(tmp_path / "logs"), "--log_with", "all", "--log_tracker_name", "my_project",
                 "--log_tracker_config", str(tracker_config), "--log_config", "--wandb_run_name", "from the flag",
                 "--wandb_api_key", "SECRET", "--output_dir", str(tmp_path / "out"), "--learning_rate", "3e-4",
                 "--network_args", "conv_dim=4", "--pretrained_model_name_or_path", "/private/base.safetensors")
    tracker = TrainingLogger(args)
    assert tracker.writer.file_writer.event_writer._flush_secs == 7  # [tensorboard] reached the SummaryWriter
    assert os.path.basename(tracker.log_dir) == "my_project"
    init = fake_wandb.calls[1]
    assert init[0] == "init" and init[1]["project"] == "my_project"
    assert init[1]["name"] == "from the flag"  # the flag over the file (upstream drops the flag)
    assert init[1]["entity"] == "team" and init[1]["tags"] == ["sdxl"]

    # the arguments minus upstream's sensitive ones; lists and other objects as strings
    (update,) = [call for call in fake_wandb.calls if call[0] == "config.update"]
    config = update[1]
    assert update[2] == {"allow_val_change": True}
    hidden = {"wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "vae", "tokenizer_cache_dir",
              "train_data_dir", "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir"}
    assert set(config) == set(vars(args)) - hidden
    assert "SECRET" not in repr(config) and "/private" not in repr(config)
    assert config["learning_rate"] == 3e-4 and config["log_with"] == "all" and config["seed"] is None
    assert config["network_args"] == "['conv_dim=4']" and config["log_config"] is True
    tracker.close()
    # TensorBoard: hparams events and accelerate's hparams.yml in a sub-folder of the tracker's
    (hparams_file,) = glob.glob(os.path.join(tracker.log_dir, "*", "hparams.yml"))
    assert yaml.safe_load(open(hparams_file)) == config
    assert glob.glob(os.path.join(os.path.dirname(hparams_file), "events.out.tfevents.*"))


def test_wandb_alone_with_upstream_defaults(tmp_path, fake_wandb):
    tracker = TrainingLogger(parse("--log_with", "wandb"))
    assert tracker.writer is None
    assert fake_wandb.calls[0] == ("init", {"project": "network_train"})  # no login, no name, no dir
    assert not any(call[0] == "config.update" for call in fake_wandb.calls)
    tracker.log_step({"loss/current": 1.0}, 1, 1)
    tracker.close()
    assert fake_wandb.calls[-2:] == [("log", {"loss/current": 1.0, "global_step": 1, "epoch": 1},
                                      {"step": None, "commit": None}), ("finish",)]


def test_other_ranks_and_tensorboard_alone_touch_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    args = parse("--logging_dir", str(tmp_path / "logs"))  # tensorboard by default
    check_logging_args(args)
    TrainingLogger(args).close()
    assert len(glob.glob(str(tmp_path / "logs" / "*" / "network_train" / "events.out.tfevents.*"))) == 1
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    silent = TrainingLogger(parse("--logging_dir", str(tmp_path / "rank1"), "--log_with", "all"), enabled=False)
    silent.log_step({"loss/current": 1.0}, 1, 1)
    silent.close()
    assert fake.calls == [] and not os.path.exists(tmp_path / "rank1")


def test_missing_wandb_fails_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    for log_with in ("wandb", "all"):
        args = parse("--log_with", log_with, "--logging_dir", str(tmp_path / "logs"), "--output_dir", str(tmp_path),
                     "--network_module", "networks.lora",
                     "--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"))
        with pytest.raises(ValueError, match=rf"^--log_with {log_with}: wandb is not installed; install it \(pip "
                                             r"install wandb, or this project's extra: pip install '\.\[wandb\]'\) or "
                                             r"use --log_with tensorboard$"):
            sdxl_train_network.SdxlNetworkTrainer().train(args)


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("[wandb\n", "invalid TOML"),
    ('entity = "team"\n', "'entity' is not a table; expected [tensorboard] and/or [wandb] tables of init arguments"),
])
def test_bad_tracker_config_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "trackers.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=rf"^--log_tracker_config {re.escape(str(path))}: {re.escape(message)}"):
        check_logging_args(parse("--log_tracker_config", str(path)))


def test_tracker_config_ignores_other_trackers_with_a_warning(tmp_path, caplog):
    path = tmp_path / "trackers.toml"
    path.write_text('[comet_ml]\nworkspace = "x"\n[wandb]\nentity = "team"\n')
    assert read_tracker_config(str(path)) == {"wandb": {"entity": "team"}}
    assert caplog.messages == [f"--log_tracker_config {path}: [comet_ml] ignored (this port logs to tensorboard and "
                               "wandb)"]


def test_tensorboard_needs_a_logging_dir():
    with pytest.raises(ValueError, match=r"^--log_with tensorboard requires --logging_dir \(the TensorBoard folder\)$"):
        check_logging_args(parse("--log_with", "tensorboard"))
