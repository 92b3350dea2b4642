"""Train an SDXL LoRA with Kohya's command line, in MindSpore graph mode.

    python sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors --dataset_config data.toml \
        --network_module networks.lora --network_dim 16 --output_dir out --output_name my_lora

`SdxlNetworkTrainer` supplies the SDXL parts of `NetworkTrainer`; `TrainStepForSDXLLoRA` is the compiled cell
that runs one step: latents (VAE or cache) -> text conditioning (encoders or cache) -> noise and timesteps ->
UNet -> loss and weighting -> backward -> optimizer (gradient accumulation, clipping and loss scaling are
mindone's `TrainStep`); what is not SDXL's is shared with SD 1.x / 2.x (`train_network.TrainStepForLoRA`).
"""

import logging
import os
import sys

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md
from library import console  # noqa: E402
console.quiet_third_party_output()  # before mindspore, which reads GLOG_v when it loads

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import ops  # noqa: E402

import train_network  # noqa: E402
from sdxl_minimal_inference import SdxlPipeline  # noqa: E402
from library import caching, sdxl_model_util, sdxl_train_util  # noqa: E402
from library.sdxl_text_encoding import encode_tokens_sdxl, encode_tokens_with_weights_sdxl  # noqa: E402
from library.sdxl_tokenize import SdxlTokenizeStrategy  # noqa: E402

logger = logging.getLogger(__name__)


def sdxl_get_text_cond(text_encoder1, text_encoder2, input_ids1, input_ids2, token_weights1=None, token_weights2=None):
    """(hidden_state1, hidden_state2, pool2) of both encoders, as training uses them; with --weighted_captions the
    hidden states are weighted per token."""
    if token_weights1 is None:
        return encode_tokens_sdxl(text_encoder1, text_encoder2, input_ids1, input_ids2)
    return encode_tokens_with_weights_sdxl(text_encoder1, text_encoder2, input_ids1, input_ids2, token_weights1,
                                           token_weights2)


def sdxl_call_unet(unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw,
                   weight_dtype):
    """UNet(noisy latents) with SDXL's conditioning: context = [h1, h2], y = [pool2, size embeddings]."""
    hidden_state1, hidden_state2, pool2 = text_conds
    size_embeddings = sdxl_train_util.get_size_embeddings(original_sizes_hw, crop_top_lefts, target_sizes_hw)
    y = ops.cat((pool2.astype(weight_dtype), size_embeddings.astype(weight_dtype)), axis=1)
    context = ops.cat((hidden_state1, hidden_state2), axis=2).astype(weight_dtype)
    return unet(noisy_latents.astype(weight_dtype), timesteps, context, y)


class TrainStepForSDXLLoRA(train_network.TrainStepForLoRA):
    """One SDXL LoRA training step as one graph (the shared steps: train_network.TrainStepForLoRA).

    Text fields: ids1, ids2 [, token_weights1, token_weights2 with --weighted_captions] | the cached h1, h2, pool2.
    The UNet gets SDXL's conditioning from both encoders and the batch's size fields.
    """

    def set_text_encoders(self, text_encoders):
        self.text_encoder1, self.text_encoder2 = text_encoders

    def count_text_fields(self, text_encoder_outputs_cached: bool, weighted_captions: bool) -> int:
        return 3 if text_encoder_outputs_cached else (4 if weighted_captions else 2)

    def get_text_cond(self, text_fields):
        return sdxl_get_text_cond(self.text_encoder1, self.text_encoder2, *text_fields)

    def call_unet(self, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw):
        return sdxl_call_unet(self.unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts,
                              target_sizes_hw, self.weight_dtype)


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    is_sdxl = True
    vae_scale_factor = sdxl_model_util.VAE_SCALE_FACTOR
    model_version_metadata = "sdxl_base_v1-0"
    train_step_class = TrainStepForSDXLLoRA
    latents_npz_suffix = caching.LATENTS_NPZ_SUFFIX

    def assert_extra_args(self, args, train_dataset_group):
        sdxl_train_util.verify_sdxl_training_args(args)
        if args.cache_text_encoder_outputs:
            if not args.network_train_unet_only:
                raise ValueError("--cache_text_encoder_outputs requires --network_train_unet_only")
            if not train_dataset_group.is_text_encoder_output_cacheable():
                raise ValueError(
                    "when caching Text Encoder output, either caption_dropout_rate, shuffle_caption, "
                    "token_warmup_step or caption_tag_dropout_rate cannot be used"
                )
        train_dataset_group.verify_bucket_reso_steps(32)

    def load_target_model(self, args, weight_dtype):
        te1, te2, vae, unet, _ = sdxl_train_util.load_target_model(args)
        return (te1, te2), vae, unet

    def load_tokenizer(self, args):
        return SdxlTokenizeStrategy(args.max_token_length, args.tokenizer_cache_dir)

    def get_text_cond(self, args, input_ids1, input_ids2, text_encoders, weight_dtype):
        return sdxl_get_text_cond(text_encoders[0], text_encoders[1], input_ids1, input_ids2)

    def call_unet(self, args, unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts,
                  target_sizes_hw, weight_dtype):
        return sdxl_call_unet(unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts,
                              target_sizes_hw, weight_dtype)

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_group, tokenize_strategy):
        def encode(ids1: np.ndarray, ids2: np.ndarray):
            outputs = sdxl_get_text_cond(text_encoders[0], text_encoders[1], ms.Tensor(ids1), ms.Tensor(ids2))
            return tuple(o.asnumpy().astype(np.float32) for o in outputs)

        caching.cache_text_encoder_outputs(
            dataset_group, encode, tokenize_strategy, args.vae_batch_size,
            args.cache_text_encoder_outputs_to_disk, args.skip_cache_check,
            **train_network.cache_sharding(args.cache_text_encoder_outputs_to_disk),
        )

    def build_sample_pipeline(self, args, text_encoders, vae, unet, tokenize_strategy, weight_dtype):
        return SdxlPipeline.from_models(*text_encoders, vae, unet, tokenize_strategy, dtype=weight_dtype,
                                        vae_dtype=train_network.vae_dtype_for(args),
                                        v_parameterization=args.v_parameterization)

    def train_step_kwargs(self, args) -> dict:
        return {}


def setup_parser():
    parser = train_network.setup_parser()
    sdxl_train_util.add_sdxl_training_arguments(parser)
    return parser


def main(argv=None):
    return train_network.run(SdxlNetworkTrainer(), setup_parser(), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
