"""Cache the text encoders' outputs to disk before training (kohya-ss/sd-scripts'
tools/cache_text_encoder_outputs.py, SDXL only).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config data.toml [--max_token_length 225] [--mixed_precision fp16] [--vae_batch_size 8]

Takes the trainer's flags (`sdxl_train_network.setup_parser()`), builds the dataset and tokenizer exactly as the
trainer does and writes `<stem>_te_outputs.npz` (hidden_state1, hidden_state2, pool2) beside each image with the
trainer's own encoder (`SdxlNetworkTrainer.cache_text_encoder_outputs`, i.e. `library.caching`; batches of
`--vae_batch_size` captions, as in training). Train on them with
`--cache_text_encoder_outputs_to_disk --network_train_unet_only` and the same caption settings. As upstream,
`--cache_text_encoder_outputs_to_disk` is forced on, existing valid caches are kept (rebuilt when the token length
changed, unless `--skip_cache_check`) and `--skip_existing` is an accepted no-op. Captions that change between
steps (shuffle_caption, caption dropout, token warmup, wildcards) cannot be cached: an error.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cache_latents import load_models, parse_args, prepare_dataset_groups, setup_parser  # noqa: E402
import train_network  # noqa: E402
from library import console, distributed  # noqa: E402


def cache_to_disk(args):
    args.sdxl = True  # SDXL's text encoders only (`--sdxl` is accepted, as upstream)
    args.cache_text_encoder_outputs = True
    args.cache_text_encoder_outputs_to_disk = True
    trainer, tokenize_strategy, groups = prepare_dataset_groups(args)
    if not all(group.is_text_encoder_output_cacheable() for group in groups):
        raise ValueError(
            "when caching text-encoder outputs, none of caption_dropout_rate, caption_dropout_every_n_epochs, "
            "shuffle_caption, token_warmup_step, caption_tag_dropout_rate or enable_wildcard can be used"
        )

    text_encoders, _, _, weight_dtype = load_models(args)
    for text_encoder in text_encoders:
        train_network.cast_parameters(text_encoder, weight_dtype)
    for group in groups:
        trainer.cache_text_encoder_outputs(args, text_encoders, group, tokenize_strategy)
    distributed.barrier()
    if distributed.get_state().is_main_process:
        print("Finished caching text encoder outputs to disk.")


def main(argv=None):
    parser = setup_parser(" ".join(__doc__.split("\n\n")[0].split()))
    args = parse_args(parser, argv)
    console.setup_logging(args)
    try:
        cache_to_disk(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
