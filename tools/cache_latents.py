"""Cache latents to disk before training (kohya-ss/sd-scripts' tools/cache_latents.py): SD 1.x / 2.x by default
(`--v2` for SD 2.x), SDXL with `--sdxl`, as upstream.

    python tools/cache_latents.py --sdxl --pretrained_model_name_or_path sdxl.safetensors --dataset_config data.toml \
        [--vae sdxl_vae.safetensors] [--no_half_vae --mixed_precision fp16] [--vae_batch_size 4] [--skip_cache_check]
    python tools/cache_latents.py --pretrained_model_name_or_path v1-5-pruned.safetensors --dataset_config data.toml

Takes the trainer's flags (`sdxl_train_network.setup_parser()`: the same dataset flags, `--dataset_config` and
`--config_file` work, training-only flags are accepted and ignored), builds the dataset exactly as the trainer
does and writes `<stem>_<W>x<H>_sdxl.npz` (SD: `_sd.npz`) beside each image with the trainer's own encoder
(`SdxlNetworkTrainer.cache_latents` / `NetworkTrainer.cache_latents`, i.e. `library.caching`), so a later
training run with `--cache_latents_to_disk` and the same dataset settings finds them valid and skips
the VAE. As upstream, `--cache_latents_to_disk` is forced on, an existing valid cache is kept (rebuilt when it is
for another bucket size, unless `--skip_cache_check`), and `--skip_existing` is accepted as the deprecated no-op
it is upstream. Under msrun the images are split across processes as in training.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md

import sdxl_train_network  # noqa: E402  (quiets third-party output before mindspore loads)
import train_network  # noqa: E402
from library import config_util, console, distributed, model_util, sdxl_train_util, train_util  # noqa: E402

logger = logging.getLogger(__name__)


def add_cache_tool_arguments(parser):
    """Upstream's tool-only flags on top of the trainer's parser."""
    parser.add_argument("--sdxl", action="store_true", help="SDXL models (default: SD 1.x, or 2.x with --v2)")
    parser.add_argument("--flux", action="store_true", help="upstream's FLUX mode; not supported here (an error)")
    parser.add_argument(
        "--skip_existing",
        action="store_true",
        help="[Deprecated upstream] no effect: existing .npz files are always checked and kept when valid; "
        "use --skip_cache_check to keep them unchecked",
    )


def setup_parser(description: str = __doc__.splitlines()[0]):
    parser = sdxl_train_network.setup_parser()
    parser.description = description
    add_cache_tool_arguments(parser)
    return parser


def parse_args(parser, argv=None):
    """parse_args + `--config_file`, as the trainer's main does it."""
    return train_util.read_config_from_file(parser.parse_args(argv), parser, argv)


def prepare_dataset_groups(args):
    """(trainer, tokenize_strategy, groups): the trainer's argument checks, tokenizer and dataset groups, built as
    `NetworkTrainer.train` builds them (before any model loads). `groups` is the training group plus the
    validation group when some dataset has validation_split > 0 (the split depends on --seed; caching both makes
    the caches complete whatever seed training uses)."""
    distributed.init_distributed()  # under msrun, first (the scheduler process stops here)
    if args.flux:
        raise ValueError("--flux: FLUX models are not supported by this port; it caches SDXL and SD 1.x/2.x")
    path = args.pretrained_model_name_or_path
    if not args.sdxl and path and os.path.isfile(path) and model_util.is_sdxl_checkpoint(path):
        raise ValueError(f"--pretrained_model_name_or_path {path}: an SDXL checkpoint; pass --sdxl (without it the "
                         "tool caches for SD 1.x/2.x, as upstream)")
    if args.skip_existing:
        logger.info("--skip_existing has no effect (deprecated upstream): existing caches are always checked and "
                    "kept when valid; --skip_cache_check keeps them without checking")
    train_util.check_unsupported_flags(args, logger.info)
    if args.sdxl:
        sdxl_train_util.verify_sdxl_training_args(args)
    else:
        train_network.verify_sd_training_args(args)
    config_util.prepare_dataset_args(args)
    if args.seed is not None:
        train_network.set_seed(args.seed)
    trainer = sdxl_train_network.SdxlNetworkTrainer() if args.sdxl else train_network.NetworkTrainer()
    tokenize_strategy = trainer.load_tokenizer(args)
    train_group, val_group = config_util.build_dataset_groups(args, tokenize_strategy)
    if len(train_group) == 0:
        raise ValueError("no training images found: check --train_data_dir / --dataset_config")
    groups = [train_group] + ([val_group] if val_group is not None else [])
    for group in groups:
        group.verify_bucket_reso_steps(32 if args.sdxl else 64)
    return trainer, tokenize_strategy, groups


def load_models(args):
    """(text_encoders, vae, unet) with the trainer's loader, context and dtypes."""
    train_network.configure_mindspore(args)
    weight_dtype, _ = train_network.prepare_dtype(args)
    if not args.sdxl:
        text_encoder, vae, unet = train_network.load_sd_models(args)
        return (text_encoder,), vae, unet, weight_dtype
    te1, te2, vae, unet, _ = sdxl_train_util.load_target_model(args)
    return (te1, te2), vae, unet, weight_dtype


def cache_to_disk(args):
    args.cache_latents = True
    args.cache_latents_to_disk = True
    trainer, _, groups = prepare_dataset_groups(args)
    if not all(group.is_latent_cacheable() for group in groups):
        raise ValueError("when caching latents, either color_aug or random_crop cannot be used")

    _, vae, _, _ = load_models(args)
    train_network.cast_parameters(vae, train_network.vae_dtype_for(args))
    for group in groups:
        trainer.cache_latents(args, vae, group)
    distributed.barrier()
    if distributed.get_state().is_main_process:
        print("Finished caching latents to disk.")


def main(argv=None):
    parser = setup_parser()
    args = parse_args(parser, argv)
    console.setup_logging(args)
    try:
        cache_to_disk(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
