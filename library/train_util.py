"""Command-line argument groups of the trainer (upstream's flag names, types and defaults), `--config_file`,
argument checks, checkpoint names and the loss moving average."""

import argparse
import logging
import os
import tempfile

import toml

from library import custom_train_functions, samplers
from library.bucketing import INTERPOLATIONS

logger = logging.getLogger(__name__)


def add_dataset_arguments(
    parser: argparse.ArgumentParser, support_dreambooth: bool, support_caption: bool, support_caption_dropout: bool
):
    """Upstream's `add_dataset_arguments`: the dataset, caption, augmentation and caching flags."""
    parser.add_argument("--train_data_dir", type=str, default=None, help="directory for train images")
    parser.add_argument(
        "--cache_info",
        action="store_true",
        help="cache meta information (caption and image size) for faster dataset loading (DreamBooth only)",
    )
    parser.add_argument("--shuffle_caption", action="store_true", help="shuffle separated caption")
    parser.add_argument("--caption_separator", type=str, default=",", help="separator for caption")
    parser.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    parser.add_argument(
        "--caption_extention", type=str, default=None, help="extension of caption files (backward compatibility spelling)"
    )
    parser.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="keep heading N tokens when shuffling caption tokens (token means comma separated strings)",
    )
    parser.add_argument(
        "--keep_tokens_separator",
        type=str,
        default="",
        help="separator between the fixed and the shuffled parts of a caption (overrides --keep_tokens)",
    )
    parser.add_argument(
        "--secondary_separator",
        type=str,
        default=None,
        help="a secondary separator for caption, replaced by caption_separator after dropping/shuffling",
    )
    parser.add_argument("--enable_wildcard", action="store_true", help="enable wildcard for caption (e.g. '{image|picture}')")
    parser.add_argument("--caption_prefix", type=str, default=None, help="prefix for caption text")
    parser.add_argument("--caption_suffix", type=str, default=None, help="suffix for caption text")
    parser.add_argument("--color_aug", action="store_true", help="enable weak color augmentation")
    parser.add_argument("--flip_aug", action="store_true", help="enable horizontal flip augmentation")
    parser.add_argument(
        "--face_crop_aug_range",
        type=str,
        default=None,
        help="enable face-centered crop augmentation and its range (e.g. 2.0,4.0); not supported by this trainer",
    )
    parser.add_argument("--random_crop", action="store_true", help="enable random crop")
    parser.add_argument("--debug_dataset", action="store_true", help="print what the dataset produces (do not train)")
    parser.add_argument("--resolution", type=str, default=None, help="resolution in training ('size' or 'width,height')")
    parser.add_argument("--cache_latents", action="store_true", help="cache latents to main memory (augmentations must be disabled)")
    parser.add_argument("--vae_batch_size", type=int, default=1, help="batch size for caching latents")
    parser.add_argument("--cache_latents_to_disk", action="store_true", help="cache latents to disk (augmentations must be disabled)")
    parser.add_argument(
        "--skip_cache_check",
        action="store_true",
        help="skip the content validation of caches (latents and text encoder outputs); existence is always checked",
    )
    parser.add_argument("--enable_bucket", action="store_true", help="enable buckets for multi aspect ratio training")
    parser.add_argument(
        "--min_bucket_reso", type=int, default=256, help="minimum resolution for buckets, must be divisible by bucket_reso_steps"
    )
    parser.add_argument(
        "--max_bucket_reso", type=int, default=1024, help="maximum resolution for buckets, must be divisible by bucket_reso_steps"
    )
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="steps of resolution for buckets (SD: divisible by 64, SDXL: by 32)")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="make bucket for each image without upscaling")
    parser.add_argument(
        "--resize_interpolation",
        type=str,
        default=None,
        choices=[i for i in INTERPOLATIONS if i != "box"],
        help="resize interpolation; default: area to shrink, lanczos to enlarge",
    )
    parser.add_argument("--token_warmup_min", type=int, default=1, help="start learning at N tags (comma-separated)")
    parser.add_argument(
        "--token_warmup_step",
        type=float,
        default=0,
        help="tag length reaches maximum on N steps (or N*max_train_steps if N<1); 0 = from the start",
    )
    parser.add_argument("--alpha_mask", action="store_true", help="use alpha channel as mask for training")
    parser.add_argument(
        "--dataset_class", type=str, default=None, help="dataset class for arbitrary dataset (package.module.Class)"
    )

    if support_caption_dropout:
        parser.add_argument("--caption_dropout_rate", type=float, default=0.0, help="rate of dropping whole captions (0.0~1.0)")
        parser.add_argument(
            "--caption_dropout_every_n_epochs", type=int, default=0, help="drop all captions every N epochs"
        )
        parser.add_argument(
            "--caption_tag_dropout_rate", type=float, default=0.0, help="rate of dropping comma-separated tags (0.0~1.0)"
        )

    if support_dreambooth:
        parser.add_argument("--reg_data_dir", type=str, default=None, help="directory for regularization images")

    if support_caption:
        parser.add_argument("--in_json", type=str, default=None, help="json metadata for dataset")
        parser.add_argument("--dataset_repeats", type=int, default=1, help="repeat dataset when training with captions")


# ---------------------------------------------------------------------------------------------------------------
# model, training, saving and logging flags


TORCH_ONLY_FLAGS = {
    # flag: what this port does instead (logged when the flag is given)
    "xformers": "MindSpore has no xformers; attention uses the math kernel (flash attention on Ascend)",
    "sdpa": "torch SDPA does not exist here; attention uses the math kernel (flash attention on Ascend)",
    "mem_eff_attn": "attention uses the math kernel (flash attention on Ascend)",
    "torch_compile": "training already runs as a compiled MindSpore graph (GRAPH_MODE)",
    "lowram": "models are loaded to host memory and placed by MindSpore; the flag changes nothing",
    "lowvram": "MindSpore manages device memory itself; the flag changes nothing",
    "highvram": "MindSpore manages device memory itself; the flag changes nothing",
    "persistent_data_loader_workers": "batches are built in the main process; the flag changes nothing",
    "max_data_loader_n_workers": "batches are built in the main process; the flag changes nothing",
    "dynamo_backend": "training already runs as a compiled MindSpore graph (GRAPH_MODE)",
    "ddp_timeout": "data-parallel training uses msrun, not torch DDP; the flag changes nothing",
    "ddp_gradient_as_bucket_view": "data-parallel training uses msrun, not torch DDP; the flag changes nothing",
    "ddp_static_graph": "data-parallel training uses msrun, not torch DDP; the flag changes nothing",
    "disable_mmap_load_safetensors": "checkpoints are always read fully into host memory; the flag changes nothing",
}
DEFAULT_DATA_LOADER_WORKERS = 8
# upstream's torch.compile backends, accepted and noted (see TORCH_ONLY_FLAGS)
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt",
                   "onnxrt", "tensort", "ipex", "tvm")
DEEPSPEED_REASON = "DeepSpeed is torch-only; use data-parallel training with msrun (see README)"
HUGGINGFACE_REASON = "not supported offline: upload the file yourself"
UNSUPPORTED_FLAGS = {
    # flag: why it is refused (an error whenever it is set to anything but its default)
    "deepspeed": DEEPSPEED_REASON,
    "zero_stage": DEEPSPEED_REASON,
    "offload_optimizer_device": DEEPSPEED_REASON,
    "offload_optimizer_nvme_path": DEEPSPEED_REASON,
    "offload_param_device": DEEPSPEED_REASON,
    "offload_param_nvme_path": DEEPSPEED_REASON,
    "zero3_init_flag": DEEPSPEED_REASON,
    "zero3_save_16bit_model": DEEPSPEED_REASON,
    "fp16_master_weights_and_gradients": DEEPSPEED_REASON,
    "huggingface_repo_id": HUGGINGFACE_REASON,
    "huggingface_repo_type": HUGGINGFACE_REASON,
    "huggingface_path_in_repo": HUGGINGFACE_REASON,
    "huggingface_token": HUGGINGFACE_REASON,
    "huggingface_repo_visibility": HUGGINGFACE_REASON,
    "save_state_to_huggingface": HUGGINGFACE_REASON,
    "async_upload": HUGGINGFACE_REASON,
    "resume_from_huggingface": "not supported offline: download the state and pass its folder to --resume",
    "fp8_base": "fp8 base weights are not supported by this MindSpore port",
    "fp8_base_unet": "fp8 base weights are not supported by this MindSpore port",
    "cpu_offload_checkpointing": "not supported (it also crashes upstream for SDXL)",
    "fused_backward_pass": "not supported (it has no effect in upstream's train_network either)",
    "dataset_class": "custom dataset classes are not supported; use --dataset_config",
    "lr_decay_steps": "warmup_stable_decay is not implemented (see --lr_scheduler)",
    "lr_scheduler_min_lr_ratio": "cosine_with_min_lr / warmup_stable_decay are not implemented",
    "lr_scheduler_timescale": "inverse_sqrt is not implemented",
}
# the noted or refused flags whose default is not None or False: they count as given when they differ from it
NON_EMPTY_DEFAULTS = {"max_data_loader_n_workers": DEFAULT_DATA_LOADER_WORKERS, "dynamo_backend": "inductor",
                      "zero_stage": 2}


def add_sd_models_arguments(parser):
    parser.add_argument("--v2", action="store_true", help="load a Stable Diffusion 2.x model (train_network.py)")
    parser.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768-v, ...)")
    parser.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help="base model: a single-file .safetensors checkpoint (SD 1.x/2.x for train_network.py, SDXL for "
             "sdxl_train_network.py)"
    )
    parser.add_argument("--tokenizer_cache_dir", type=str, default=None, help="directory to save/load the tokenizers")


def add_training_arguments(parser):
    parser.add_argument("--output_dir", type=str, default=None, help="directory for trained models")
    parser.add_argument("--output_name", type=str, default=None, help="base name of trained model files")
    parser.add_argument("--huggingface_repo_id", type=str, default=None, help="not supported; see README")
    parser.add_argument("--huggingface_repo_type", type=str, default=None, help="not supported; see README")
    parser.add_argument("--huggingface_path_in_repo", type=str, default=None, help="not supported; see README")
    parser.add_argument("--huggingface_token", type=str, default=None, help="not supported; see README")
    parser.add_argument("--huggingface_repo_visibility", type=str, default=None, help="not supported; see README")
    parser.add_argument("--save_state_to_huggingface", action="store_true", help="not supported; see README")
    parser.add_argument("--resume_from_huggingface", action="store_true", help="not supported; see README")
    parser.add_argument("--async_upload", action="store_true", help="not supported; see README")
    parser.add_argument(
        "--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"], help="precision of saved files"
    )
    parser.add_argument("--save_every_n_epochs", type=int, default=None, help="save a checkpoint every N epochs")
    parser.add_argument("--save_every_n_steps", type=int, default=None, help="save a checkpoint every N steps")
    parser.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save N checkpoints over the run at least")
    parser.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch checkpoints")
    parser.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    parser.add_argument("--save_last_n_steps", type=int, default=None, help="keep checkpoints of the last N steps only")
    parser.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep states of the last N steps only")
    parser.add_argument("--save_state", action="store_true", help="save the training state with each checkpoint")
    parser.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    parser.add_argument("--resume", type=str, default=None, help="resume from a saved state directory")
    parser.add_argument("--train_batch_size", type=int, default=1, help="batch size")
    parser.add_argument("--max_token_length", type=int, default=None, choices=[None, 150, 225], help="max token length")
    parser.add_argument("--mem_eff_attn", action="store_true", help="torch-only; see README")
    parser.add_argument("--torch_compile", action="store_true", help="torch-only; see README")
    parser.add_argument("--dynamo_backend", type=str, default="inductor", choices=DYNAMO_BACKENDS,
                        help="torch-only; see README")
    parser.add_argument("--xformers", action="store_true", help="torch-only; see README")
    parser.add_argument("--sdpa", action="store_true", help="torch-only; see README")
    parser.add_argument("--vae", type=str, default=None, help="VAE to use instead of the checkpoint's")
    parser.add_argument("--max_train_steps", type=int, default=1600, help="training steps")
    parser.add_argument("--max_train_epochs", type=int, default=None, help="training epochs (overrides max_train_steps)")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=DEFAULT_DATA_LOADER_WORKERS,
                        help="accepted; batches are built in-process")
    parser.add_argument("--persistent_data_loader_workers", action="store_true", help="torch-only; see README")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="steps to accumulate gradients over")
    parser.add_argument(
        "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="mixed precision"
    )
    parser.add_argument("--full_fp16", action="store_true", help="fp16 training including the LoRA weights")
    parser.add_argument("--full_bf16", action="store_true", help="bf16 training including the LoRA weights")
    parser.add_argument("--fp8_base", action="store_true", help="not supported; see README")
    parser.add_argument("--fp8_base_unet", action="store_true", help="not supported; see README")
    parser.add_argument("--ddp_timeout", type=int, default=None, help="torch-only; see README")
    parser.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="torch-only; see README")
    parser.add_argument("--ddp_static_graph", action="store_true", help="torch-only; see README")
    parser.add_argument("--lowram", action="store_true", help="torch-only; see README")
    parser.add_argument("--highvram", action="store_true", help="torch-only; see README")
    parser.add_argument("--cpu_offload_checkpointing", action="store_true", help="not supported; see README")
    parser.add_argument("--deepspeed", action="store_true", help="not supported; see README")
    parser.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed: not supported")
    parser.add_argument("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                        help="DeepSpeed: not supported")
    parser.add_argument("--offload_optimizer_nvme_path", type=str, default=None, help="DeepSpeed: not supported")
    parser.add_argument("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"],
                        help="DeepSpeed: not supported")
    parser.add_argument("--offload_param_nvme_path", type=str, default=None, help="DeepSpeed: not supported")
    parser.add_argument("--zero3_init_flag", action="store_true", help="DeepSpeed: not supported")
    parser.add_argument("--zero3_save_16bit_model", action="store_true", help="DeepSpeed: not supported")
    parser.add_argument("--fp16_master_weights_and_gradients", action="store_true", help="DeepSpeed: not supported")
    parser.add_argument("--logging_dir", type=str, default=None, help="enable logging: TensorBoard logs go here")
    parser.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                        help="logging tool(s): all = TensorBoard and wandb (wandb: pip install wandb)")
    parser.add_argument("--log_prefix", type=str, default=None, help="prefix of each log directory's name")
    parser.add_argument("--log_tracker_name", type=str, default=None,
                        help="tracker name (TensorBoard subfolder, wandb project); default network_train")
    parser.add_argument("--wandb_run_name", type=str, default=None, help="name of the wandb run")
    parser.add_argument("--log_tracker_config", type=str, default=None,
                        help="TOML file of tracker init arguments ([tensorboard] and [wandb] tables)")
    parser.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key to log in with before training")
    parser.add_argument("--log_config", action="store_true",
                        help="log the training arguments (without API keys and paths) as the tracker config")
    parser.add_argument("--skip_until_initial_step", action="store_true",
                        help="skip the batches before --initial_step / --initial_epoch without training them")
    parser.add_argument("--initial_epoch", type=int, default=None,
                        help="epoch to start at, 1 = the first; the LR scheduler still starts at 0 without --resume")
    parser.add_argument("--initial_step", type=int, default=None,
                        help="step to start at, counted over all epochs, 0 = the first; overrides --initial_epoch")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight for regularization images")
    parser.add_argument("--clip_skip", type=int, default=None,
                        help="use the output of the N-th layer from the end of the text encoder (SD 1.x; no effect "
                             "for SDXL)")
    parser.add_argument("--lowvram", action="store_true", help="torch-only; see README")
    parser.add_argument("--compile_cache_dir", type=str, default=None,
                        help="MindSpore compile cache: the compiled training step is kept here and reused by later runs "
                             "with the same model, network and flags")
    parser.add_argument("--static_shapes", action="store_true",
                        help="compile the training step once per bucket shape instead of once for all (see README)")
    parser.add_argument("--sample_every_n_steps", type=int, default=None, help="generate sample images every N steps")
    parser.add_argument("--sample_at_first", action="store_true", help="generate sample images before training")
    parser.add_argument("--sample_every_n_epochs", type=int, default=None,
                        help="generate sample images every N epochs (overrides --sample_every_n_steps)")
    parser.add_argument("--sample_prompts", type=str, default=None,
                        help="file of prompts for sample images (.txt with --n/--w/--h/--d/--l/--s/--ss, .toml, .json)")
    parser.add_argument("--sample_sampler", type=str, default=samplers.DEFAULT_TRAINING_SAMPLER,
                        choices=samplers.SAMPLER_NAMES, help="sampler (scheduler) of the sample images")


def add_config_file_arguments(parser):
    parser.add_argument("--config_file", type=str, default=None, help="training arguments from a TOML file")
    parser.add_argument("--output_config", action="store_true", help="write the arguments to --config_file and exit")


def read_config_from_file(args, parser, argv=None):
    """`--config_file`: flatten the TOML's sections; CLI overrides the file, the file overrides defaults.
    `argv`: the command line `args` came from (None: sys.argv, as argparse).

    With `--output_config`, write the non-default arguments to the file instead and exit.
    """
    if not args.config_file:
        return args
    config_path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if args.output_config:
        if os.path.exists(config_path):
            raise SystemExit(f"--output_config: {config_path} already exists; refusing to overwrite it")
        skipped = {"config_file", "output_config", "wandb_api_key"}
        values = {
            key: value for key, value in vars(args).items()
            if key not in skipped and value != parser.get_default(key) and value is not None
        }
        tmp_path = config_path + ".tmp"
        with open(tmp_path, "w", encoding="utf-8") as f:
            toml.dump(values, f)
        os.replace(tmp_path, config_path)
        print(f"wrote the arguments to {config_path}")
        raise SystemExit(0)
    if not os.path.isfile(config_path):
        raise SystemExit(f"--config_file: {config_path} not found")
    try:
        config = toml.load(config_path)
    except toml.TomlDecodeError as e:
        raise SystemExit(f"--config_file {config_path}: invalid TOML ({e})") from e
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    # unknown keys are warned about and skipped, not refused: shared configs carry other scripts' keys (upstream
    # keeps them silently)
    known = {action.dest for action in parser._actions}
    for key in sorted(set(flat) - known):
        logger.warning("--config_file %s: unknown key '%s' ignored (not an argument of this script)", config_path, key)
        del flat[key]
    explicit = parser.parse_args(argv, namespace=argparse.Namespace(**flat))
    explicit.config_file = os.path.splitext(config_path)[0]
    return explicit


def check_unsupported_flags(args, log=print):
    """Flags this port cannot honour: torch-only switches are explained, the others are errors when set
    (their defaults are None, False or 0 unless NON_EMPTY_DEFAULTS says otherwise)."""
    for flag, reason in UNSUPPORTED_FLAGS.items():
        if _is_given(args, flag):
            raise ValueError(f"--{flag}: {reason}")
    if getattr(args, "weighted_captions", False) and (
        getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk", False)
    ):
        raise ValueError("--weighted_captions cannot be used with --cache_text_encoder_outputs: the cached outputs "
                         "are not weighted (upstream's sdxl_train.py refuses this too)")
    for flag, what_instead in TORCH_ONLY_FLAGS.items():
        if _is_given(args, flag):
            log(f"--{flag}: {what_instead}")


def _is_given(args, flag):
    value = getattr(args, flag, None)
    if flag in NON_EMPTY_DEFAULTS:
        return value is not None and value != NON_EMPTY_DEFAULTS[flag]
    return value not in (None, False)


def parse_network_args(network_args):
    """`--network_args k=v ...` -> dict of strings (split on the first '=', as upstream)."""
    kwargs = {}
    for item in network_args or []:
        if "=" not in item:
            raise ValueError(f"--network_args: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def verify_training_args(args):
    """Upstream's argument checks, as errors that name the flags (raised before any model loads)."""
    custom_train_functions.verify_noise_and_loss_args(args)
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise ValueError("--full_fp16 requires --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ValueError("--full_bf16 requires --mixed_precision bf16")
    if args.full_fp16 and args.full_bf16:
        raise ValueError("--full_fp16 and --full_bf16 cannot be used together")
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    if args.compile_cache_dir and args.gradient_accumulation_steps > 1:
        # measured on MindSpore 2.10: a cached graph with the accumulation branch steps the optimizer on every batch
        raise ValueError("--compile_cache_dir cannot be used with --gradient_accumulation_steps > 1: MindSpore 2.10 "
                         "runs the accumulation branch of a cached graph wrongly (it steps on every batch)")
    if args.train_batch_size < 1:
        raise ValueError(f"--train_batch_size must be >= 1, got {args.train_batch_size}")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0 disables clipping), got {args.max_grad_norm}")
    if args.save_model_as not in (None, "safetensors"):
        raise ValueError(f"--save_model_as {args.save_model_as}: only 'safetensors' is supported (ckpt/pt are torch pickles)")
    if args.output_dir is None and not args.debug_dataset:
        raise ValueError("--output_dir is required")
    if args.zero_terminal_snr and not args.v_parameterization:
        logger.warning("--zero_terminal_snr without --v_parameterization may give poor results")


# folders the run writes to: created and test-written before any model loads, so a bad path costs seconds
OUTPUT_DIR_FLAGS = ("output_dir", "logging_dir", "tokenizer_cache_dir", "compile_cache_dir")


def check_output_paths(args):
    """Create every folder a flag names for writing and write a probe file there; ValueError naming the flag,
    the path and the reason otherwise. (Latent and text-encoder disk caches go beside the images, whose folders
    the dataset checks.)"""
    for flag in OUTPUT_DIR_FLAGS:
        path = getattr(args, flag, None)
        if path:
            reason = _unwritable_reason(path)
            if reason:
                raise ValueError(f"--{flag} {path}: cannot write there: {reason}")


def _unwritable_reason(path):
    """Why files cannot be written into folder `path` (created if missing), or None."""
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return "it is a file, not a folder" if ancestor == os.path.abspath(path) else f"{ancestor} is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


# ---------------------------------------------------------------------------------------------------------------
# checkpoint names (upstream's patterns) and pruning

EPOCH_STATE_NAME = "{}-{:06d}-state"
STEP_STATE_NAME = "{}-step{:08d}-state"
LAST_STATE_NAME = "{}-state"


def get_epoch_ckpt_name(output_name, epoch, ext=".safetensors"):
    return f"{output_name or 'epoch'}-{epoch:06d}{ext}"


def get_step_ckpt_name(output_name, step, ext=".safetensors"):
    return f"{output_name or 'at'}-step{step:08d}{ext}"


def get_last_ckpt_name(output_name, ext=".safetensors"):
    return f"{output_name or 'last'}{ext}"


def get_remove_epoch_no(args, epoch_no):
    """The epoch whose checkpoint `--save_last_n_epochs` prunes now, or None."""
    if args.save_last_n_epochs is None or not args.save_every_n_epochs:
        return None
    remove_epoch_no = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
    return remove_epoch_no if remove_epoch_no > 0 else None


def get_remove_step_no(args, step_no, keep_last_n=None):
    """The step whose checkpoint `--save_last_n_steps` prunes now, or None."""
    keep_last_n = args.save_last_n_steps if keep_last_n is None else keep_last_n
    if keep_last_n is None or not args.save_every_n_steps:
        return None
    remove_step_no = step_no - keep_last_n - 1
    remove_step_no -= remove_step_no % args.save_every_n_steps
    return remove_step_no if remove_step_no > 0 else None


class LossRecorder:
    """Upstream's moving average: one slot per step of an epoch, overwritten in the next epoch."""

    def __init__(self):
        self.loss_list = []
        self.loss_total = 0.0

    def add(self, step: int, loss: float):
        # upstream indexes by epoch == 0, which fails after a resume into a later epoch
        if step >= len(self.loss_list):
            self.loss_list.append(loss)
        else:
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list)
