"""Train an SDXL LoRA with Kohya's command line, in MindSpore graph mode.

    python sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors --dataset_config data.toml \
        --network_module networks.lora --network_dim 16 --output_dir out --output_name my_lora

`SdxlNetworkTrainer` supplies the SDXL parts of `NetworkTrainer`; `TrainStepForSDXLLoRA` is the compiled cell
that runs one step: latents (VAE or cache) -> text conditioning (encoders or cache) -> noise and timesteps ->
UNet -> loss and weighting -> backward -> optimizer (gradient accumulation, clipping and loss scaling are
mindone's `TrainStep`).
"""

import logging
import os
import sys

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md
from library import console  # noqa: E402
console.quiet_third_party_output()  # before mindspore, which reads GLOG_v when it loads

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
with console.quiet_import():  # mindone.transformers prints and warns while it registers its models
    from mindone.diffusers.training_utils import TrainStep  # noqa: E402
from mindspore import ops  # noqa: E402
from mindspore.amp import all_finite  # noqa: E402

import train_network  # noqa: E402
from sdxl_minimal_inference import SdxlPipeline  # noqa: E402
from library import caching, distributed, sdxl_model_util, sdxl_train_util, train_util  # noqa: E402
from library.autoencoder_kl import sample_diagonal_gaussian  # noqa: E402
from library.graph_reuse import GraphEntry  # noqa: E402
from library.custom_train_functions import DiffusionNoiseAndLoss  # noqa: E402
from library.sdxl_text_encoding import encode_tokens_sdxl  # noqa: E402
from library.sdxl_tokenize import SdxlTokenizeStrategy  # noqa: E402

logger = logging.getLogger(__name__)


def sdxl_get_text_cond(text_encoder1, text_encoder2, input_ids1, input_ids2):
    """(hidden_state1, hidden_state2, pool2) of both encoders, as training uses them."""
    return encode_tokens_sdxl(text_encoder1, text_encoder2, input_ids1, input_ids2)


def sdxl_call_unet(unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw,
                   weight_dtype):
    """UNet(noisy latents) with SDXL's conditioning: context = [h1, h2], y = [pool2, size embeddings]."""
    hidden_state1, hidden_state2, pool2 = text_conds
    size_embeddings = sdxl_train_util.get_size_embeddings(original_sizes_hw, crop_top_lefts, target_sizes_hw)
    y = ops.cat((pool2.astype(weight_dtype), size_embeddings.astype(weight_dtype)), axis=1)
    context = ops.cat((hidden_state1, hidden_state2), axis=2).astype(weight_dtype)
    return unet(noisy_latents.astype(weight_dtype), timesteps, context, y)


class TrainStepForSDXLLoRA(GraphEntry, TrainStep):
    """One SDXL LoRA training step as one graph: inputs are the batch tuple followed by the host noise draws.

    Batch tuple (library.datasets): images | latents, ids1, ids2 | h1, h2, pool2, loss_weights,
    original_sizes_hw, crop_top_lefts, target_sizes_hw. Noise draws: see library.noise_sampling.NoiseSampler.
    Returns (loss, per-step unscaled loss for logging[, gradients all finite]).
    """

    def __init__(self, network, optimizer, unet, text_encoders, vae, noise_and_loss: DiffusionNoiseAndLoss, *,
                 latents_cached: bool, text_encoder_outputs_cached: bool, train_text_encoder: bool,
                 weight_dtype, vae_dtype, vae_scale_factor: float, loss_scaler=None, max_grad_norm=None,
                 gradient_accumulation_steps: int = 1, length_of_dataloader: int = -1):
        accumulation_kwargs = {}
        if gradient_accumulation_steps > 1:
            accumulation_kwargs = {"length_of_dataloader": length_of_dataloader}
        super().__init__(
            network, optimizer, loss_scaler=loss_scaler, max_grad_norm=max_grad_norm,
            gradient_accumulation_steps=gradient_accumulation_steps, gradient_accumulation_kwargs=accumulation_kwargs,
        )
        self.unet = unet
        self.text_encoder1, self.text_encoder2 = text_encoders
        self.vae = vae
        self.noise_and_loss = noise_and_loss
        self.latents_cached = latents_cached
        self.text_encoder_outputs_cached = text_encoder_outputs_cached
        self.train_text_encoder = train_text_encoder
        self.weight_dtype = weight_dtype
        self.vae_dtype = vae_dtype
        self.vae_scale_factor = vae_scale_factor
        self.num_text_fields = 3 if text_encoder_outputs_cached else 2
        self.accumulating = gradient_accumulation_steps > 1
        self.shares_repeated_blocks = not self.accumulating  # see library/graph_reuse.py

    def construct(self, *inputs):
        """mindone's TrainStep.construct, without its `if sync_gradients` branch when nothing accumulates: that
        branch makes a graph loaded from MindSpore's compile cache fail on its first step (measured, MS 2.10).
        Without accumulation the outputs end with whether every gradient was finite (the trainer stops on False)."""
        if self.accumulating:
            return super().construct(*inputs)
        outputs, grads = self.forward_and_backward(*inputs)
        grads = self.grad_accumulator.step(grads)  # the data-parallel all-reduce, if any
        grads = self.grad_scaler.unscale(grads)
        grads_finite = all_finite(grads)
        grads = self.grad_clipper.clip_grad_norm(grads)
        self.grad_scaler.step(self.optimizer, grads)
        self.grad_scaler.update()
        return (self.unscale_loss(outputs[0]),) + outputs[1:] + (grads_finite,)

    def forward(self, *inputs):
        pixels_or_latents = inputs[0]
        text_fields = inputs[1 : 1 + self.num_text_fields]
        rest = inputs[1 + self.num_text_fields :]
        loss_weights, original_sizes_hw, crop_top_lefts, target_sizes_hw = rest[0], rest[1], rest[2], rest[3]
        noise_draws = rest[4:]

        if self.latents_cached:
            latents = pixels_or_latents
        else:
            mean, logvar = self.vae.encode(pixels_or_latents.astype(self.vae_dtype))
            latents = ops.stop_gradient(sample_diagonal_gaussian(mean, logvar)).astype(ms.float32)
        latents = latents * self.vae_scale_factor

        if self.text_encoder_outputs_cached:
            text_conds = text_fields
        else:
            text_conds = sdxl_get_text_cond(self.text_encoder1, self.text_encoder2, text_fields[0], text_fields[1])
            if not self.train_text_encoder:
                text_conds = ops.stop_gradient(text_conds)

        noise, noisy_latents, timesteps = self.noise_and_loss.noisy_latents_from_draws(latents, noise_draws)
        model_pred = sdxl_call_unet(
            self.unet, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw,
            self.weight_dtype,
        )
        target = self.noise_and_loss.get_target(latents, noise, timesteps)
        loss = self.noise_and_loss.compute_loss(model_pred, target, timesteps, loss_weights)
        return self.scale_loss(loss), loss


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    vae_scale_factor = sdxl_model_util.VAE_SCALE_FACTOR
    model_version_metadata = "sdxl_base_v1-0"
    train_step_class = TrainStepForSDXLLoRA

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

    def cache_latents(self, args, vae, dataset_group):
        vae_dtype = train_network.vae_dtype_for(args)

        def encode(images: np.ndarray) -> np.ndarray:
            mean, logvar = vae.encode(ms.Tensor(images, vae_dtype))
            return sample_diagonal_gaussian(mean, logvar).asnumpy().astype(np.float32)

        caching.cache_latents(
            dataset_group, encode, args.vae_batch_size, args.cache_latents_to_disk, args.skip_cache_check,
            **cache_sharding(args.cache_latents_to_disk),
        )

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_group, tokenize_strategy):
        def encode(ids1: np.ndarray, ids2: np.ndarray):
            outputs = sdxl_get_text_cond(text_encoders[0], text_encoders[1], ms.Tensor(ids1), ms.Tensor(ids2))
            return tuple(o.asnumpy().astype(np.float32) for o in outputs)

        caching.cache_text_encoder_outputs(
            dataset_group, encode, tokenize_strategy, args.vae_batch_size,
            args.cache_text_encoder_outputs_to_disk, args.skip_cache_check,
            **cache_sharding(args.cache_text_encoder_outputs_to_disk),
        )

    def build_sample_pipeline(self, args, text_encoders, vae, unet, tokenize_strategy, weight_dtype):
        return SdxlPipeline.from_models(*text_encoders, vae, unet, tokenize_strategy, dtype=weight_dtype,
                                        vae_dtype=train_network.vae_dtype_for(args),
                                        v_parameterization=args.v_parameterization)

    def build_train_step(self, args, network, optimizer, text_encoders, vae, unet, dataset_group, weight_dtype):
        latents_cached = bool(args.cache_latents)
        text_cached = bool(args.cache_text_encoder_outputs)
        return self.train_step_class(
            network, optimizer, unet, text_encoders, None if latents_cached else vae,
            DiffusionNoiseAndLoss.from_args(args),
            latents_cached=latents_cached,
            text_encoder_outputs_cached=text_cached,
            train_text_encoder=not args.network_train_unet_only,
            weight_dtype=weight_dtype,
            vae_dtype=train_network.vae_dtype_for(args),
            vae_scale_factor=self.vae_scale_factor,
            max_grad_norm=args.max_grad_norm or None,  # Kohya's 0 means "no clipping"
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            length_of_dataloader=distributed.batches_per_rank(len(dataset_group), distributed.get_state().world_size),
        )


def cache_sharding(to_disk: bool) -> dict:
    """Data parallel: disk caches are split (image i on rank i % N, the trainer waits for all before training);
    in-memory caches are built whole by every rank (a rank may read any image over the epochs), as upstream."""
    state = distributed.get_state()
    sharding = {"show_progress": state.is_main_process}
    if to_disk:
        sharding.update(num_processes=state.world_size, process_index=state.rank)
    return sharding


def setup_parser():
    parser = train_network.setup_parser()
    sdxl_train_util.add_sdxl_training_arguments(parser)
    return parser


def main(argv=None):
    parser = setup_parser()
    args = parser.parse_args(argv)
    args = train_util.read_config_from_file(args, parser, argv)
    console.setup_logging(args)
    try:
        return SdxlNetworkTrainer().train(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
