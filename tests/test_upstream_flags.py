"""The flag-set comparison with upstream: every option of upstream's sdxl_train_network.py parser
(tests/upstream_sdxl_train_network_flags.txt) is known to this port's parser, and each one the port cannot honour
is refused, or noted, with a message that names it."""

import logging
import os

import pytest

import sdxl_train_network
import train_network
from library import lr_schedulers, sdxl_train_util, train_util

FLAG_LIST = os.path.join(os.path.dirname(__file__), "upstream_sdxl_train_network_flags.txt")

# refused by train_util.check_unsupported_flags whenever set
REFUSED = {
    "--deepspeed", "--zero_stage", "--offload_optimizer_device", "--offload_optimizer_nvme_path",
    "--offload_param_device", "--offload_param_nvme_path", "--zero3_init_flag", "--zero3_save_16bit_model",
    "--fp16_master_weights_and_gradients",
    "--huggingface_repo_id", "--huggingface_repo_type", "--huggingface_path_in_repo", "--huggingface_token",
    "--huggingface_repo_visibility", "--save_state_to_huggingface", "--resume_from_huggingface", "--async_upload",
    "--fp8_base", "--fp8_base_unet", "--cpu_offload_checkpointing", "--fused_backward_pass", "--dataset_class",
    "--lr_decay_steps", "--lr_scheduler_min_lr_ratio", "--lr_scheduler_timescale",
}
# accepted, with a one-line note of what happens instead
NOTED = {
    "--xformers", "--sdpa", "--mem_eff_attn", "--torch_compile", "--dynamo_backend", "--lowram", "--highvram",
    "--persistent_data_loader_workers", "--max_data_loader_n_workers", "--ddp_timeout",
    "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--disable_mmap_load_safetensors",
}
# implemented, with their behaviour tested where it lives (test_step_offsets, test_training_logger,
# test_masked_loss): here only that the parser knows them
TESTED_ELSEWHERE = {
    "--initial_step", "--initial_epoch", "--skip_until_initial_step", "--log_with", "--wandb_run_name",
    "--wandb_api_key", "--log_tracker_name", "--log_tracker_config", "--log_config", "--log_prefix",
    "--masked_loss", "--alpha_mask", "--conditioning_data_dir",
}
UPSTREAM_DYNAMO_BACKENDS = ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                            "fx2trt", "onnxrt", "tensort", "ipex", "tvm"]


def upstream_flags():
    with open(FLAG_LIST, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def parser():
    return sdxl_train_network.setup_parser()


def actions(parser):
    return {option: action for action in parser._actions for option in action.option_strings}


def non_default_argv(action):
    """A command line that sets `action` to something other than its default."""
    option = action.option_strings[0]
    if action.nargs == 0:
        return [option]
    if action.choices:
        return [option, str(next(c for c in action.choices if c is not None and c != action.default))]
    return [option, "value" if action.type in (None, str) else "3"]


def test_the_list_is_upstreams_whole_parser():
    flags = upstream_flags()
    assert len(flags) == len(set(flags)) == 196
    assert all(f.startswith("--") and f == f.lower() for f in flags)
    assert {"--weighted_captions", "--dynamo_backend", "--network_dim", "--cache_text_encoder_outputs",
            "--validate_every_n_epochs", "--console_log_simple", "--metadata_trigger_phrase"} <= set(flags)


def test_every_upstream_option_is_known_to_the_parser(parser):
    known = actions(parser)
    assert [f for f in upstream_flags() if f not in known] == []
    assert (REFUSED | NOTED | TESTED_ELSEWHERE) <= set(upstream_flags())


def test_defaults_are_neither_refused_nor_noted(parser):
    notes = []
    train_util.check_unsupported_flags(parser.parse_args([]), log=notes.append)
    assert notes == []


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_name_themselves(parser, flag):
    args = parser.parse_args(non_default_argv(actions(parser)[flag]))
    with pytest.raises(ValueError, match=f"^{flag}: "):
        train_util.check_unsupported_flags(args, log=lambda message: None)


def test_refusal_reasons():
    def reason(*argv):
        with pytest.raises(ValueError) as e:
            train_util.check_unsupported_flags(sdxl_train_network.setup_parser().parse_args(list(argv)))
        return str(e.value)

    assert reason("--huggingface_repo_id", "me/lora") == \
        "--huggingface_repo_id: not supported offline: upload the file yourself"
    assert "pass its folder to --resume" in reason("--resume_from_huggingface")
    assert reason("--zero_stage", "3") == \
        "--zero_stage: DeepSpeed is torch-only; use data-parallel training with msrun (see README)"


@pytest.mark.parametrize("flag", sorted(NOTED))
def test_noted_flags_name_themselves(parser, flag):
    notes = []
    train_util.check_unsupported_flags(parser.parse_args(non_default_argv(actions(parser)[flag])), log=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"{flag}: ") and len(notes[0].splitlines()) == 1


def test_dynamo_backend_has_upstreams_choices_and_torch_compiles_note(parser):
    action = actions(parser)["--dynamo_backend"]
    assert list(action.choices) == UPSTREAM_DYNAMO_BACKENDS and action.default == "inductor"
    notes = []
    train_util.check_unsupported_flags(parser.parse_args(["--torch_compile", "--dynamo_backend", "eager"]),
                                       log=notes.append)
    torch_compile_note = "training already runs as a compiled MindSpore graph (GRAPH_MODE)"
    assert notes == [f"--torch_compile: {torch_compile_note}", f"--dynamo_backend: {torch_compile_note}"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dynamo_backend", "openvino"])


def test_flags_refused_by_their_own_checks_name_themselves(parser, caplog):
    with pytest.raises(ValueError, match="^--v2 cannot be used with SDXL"):
        sdxl_train_util.verify_sdxl_training_args(parser.parse_args(["--v2"]))
    with caplog.at_level(logging.WARNING):
        sdxl_train_util.verify_sdxl_training_args(parser.parse_args(["--clip_skip", "2"]))
    assert "--clip_skip has no effect for SDXL" in caplog.text
    with pytest.raises(ValueError, match="^--lr_scheduler_type torch.optim.lr_scheduler.StepLR: custom scheduler"):
        lr_schedulers.get_scheduler_fix(parser.parse_args(["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR"]),
                                        None)
    with pytest.raises(ValueError, match="^--save_model_as ckpt: only 'safetensors'"):
        train_util.verify_training_args(parser.parse_args(["--save_model_as", "ckpt", "--output_dir", "out"]))
    with pytest.raises(ValueError, match="^--network_module networks.lycoris: only networks.lora"):
        train_network.import_network_module("networks.lycoris")
