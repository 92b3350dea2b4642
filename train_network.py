"""Train an SD 1.x / 2.x LoRA with Kohya's command line; `NetworkTrainer`, the training loop of every model family.

    python train_network.py --pretrained_model_name_or_path v1-5-pruned.safetensors --dataset_config data.toml \
        --network_module networks.lora --network_dim 16 --output_dir out --output_name my_lora   # [--v2 ...]

Read `NetworkTrainer.train` top to bottom: arguments -> seed -> datasets -> models -> caches -> network ->
optimizer and schedule -> graph-mode train step -> epochs and steps -> saves. `NetworkTrainer`'s own hooks are
SD 1.x / 2.x's, as upstream's (model loading, tokenization, latent caching, `TrainStepForSDLoRA`, sample images);
SDXL subclasses it (`sdxl_train_network.SdxlNetworkTrainer`). `TrainStepForLoRA` is what the families' train steps
share: the cell that runs forward and backward in one compiled graph.
"""

import argparse
import importlib
import logging
import math
import os
import random
import shutil
import sys
import time

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before mindspore: see DESIGN.md (oneDNN reference convs)
from library import console  # noqa: E402
console.quiet_third_party_output()  # before mindspore, which reads GLOG_v when it loads

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import ops  # noqa: E402
from mindspore.amp import all_finite  # noqa: E402
from tqdm import tqdm  # noqa: E402
with console.quiet_import():  # mindone.transformers prints and warns while it registers its models
    from mindone.diffusers.training_utils import TrainStep  # noqa: E402

from library import config_util, custom_train_functions, lr_schedulers, optimizers, sai_model_spec  # noqa: E402
from library import caching, distributed, host_memory, model_util, sdxl_train_util  # noqa: E402
from library import train_state, train_util, validation  # noqa: E402
from library.autoencoder_kl import sample_diagonal_gaussian  # noqa: E402
from library.custom_train_functions import DiffusionNoiseAndLoss  # noqa: E402
from library.graph_reuse import GraphEntry  # noqa: E402
from library.sd_text_encoding import check_clip_skip, encode_tokens_sd  # noqa: E402
from library.sdxl_text_encoding import apply_token_weights  # noqa: E402
from library.sd_tokenize import SdTokenizeStrategy  # noqa: E402
from library.datasets import debug_dataset  # noqa: E402
from library.graph_compile import CompiledStep  # noqa: E402
from library import interrupts  # noqa: E402
from library.lora_metadata import SS_METADATA_MINIMUM_KEYS, build_training_metadata  # noqa: E402
from library.noise_sampling import NoiseSampler  # noqa: E402
from library.sample_images import sample_images, should_sample  # noqa: E402
from library.sample_prompts import check_sample_prompts  # noqa: E402
from library.step_offsets import check_offset_args, start_position  # noqa: E402
from library.training_logger import TrainingLogger, check_logging_args  # noqa: E402
from sd_minimal_inference import VAE_SCALE_FACTOR, SdPipeline  # noqa: E402

logger = logging.getLogger(__name__)


class TrainStepForLoRA(GraphEntry, TrainStep):
    """One LoRA training step as one graph: inputs are the batch tuple followed by the host noise draws.

    Batch tuple (library.datasets): images | latents, `num_text_fields` text fields (token ids, or cached
    text-encoder outputs), loss_weights, original_sizes_hw, crop_top_lefts, target_sizes_hw[, alpha_masks with
    masked loss]. Noise draws: see library.noise_sampling.NoiseSampler. Returns (loss, per-step unscaled loss for
    logging[, gradients all finite]).

    A model family sets its text encoders (`set_text_encoders`, called between the UNet and the VAE so that the
    cells keep the order the compile-cache key was first computed with), `num_text_fields`, and the two
    model-specific parts of the forward: `get_text_cond(text_fields)` and `call_unet(noisy_latents, timesteps,
    text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw)`.
    """

    # an optional input is a class-level False, set on the instance only when on: a plain step keeps the
    # attributes, and so the compile-cache key (library/graph_compile.py), it had before the input existed
    masked_loss = False

    def __init__(self, network, optimizer, unet, text_encoders, vae, noise_and_loss: DiffusionNoiseAndLoss, *,
                 latents_cached: bool, text_encoder_outputs_cached: bool, train_text_encoder: bool,
                 weight_dtype, vae_dtype, vae_scale_factor: float, loss_scaler=None, max_grad_norm=None,
                 gradient_accumulation_steps: int = 1, length_of_dataloader: int = -1, weighted_captions: bool = False,
                 masked_loss: bool = False):
        accumulation_kwargs = {}
        if gradient_accumulation_steps > 1:
            accumulation_kwargs = {"length_of_dataloader": length_of_dataloader}
        super().__init__(
            network, optimizer, loss_scaler=loss_scaler, max_grad_norm=max_grad_norm,
            gradient_accumulation_steps=gradient_accumulation_steps, gradient_accumulation_kwargs=accumulation_kwargs,
        )
        self.unet = unet
        self.set_text_encoders(text_encoders)
        self.vae = vae
        self.noise_and_loss = noise_and_loss
        self.latents_cached = latents_cached
        self.text_encoder_outputs_cached = text_encoder_outputs_cached
        self.train_text_encoder = train_text_encoder
        self.weight_dtype = weight_dtype
        self.vae_dtype = vae_dtype
        self.vae_scale_factor = vae_scale_factor
        self.num_text_fields = self.count_text_fields(text_encoder_outputs_cached, weighted_captions)
        self.accumulating = gradient_accumulation_steps > 1
        self.shares_repeated_blocks = not self.accumulating  # see library/graph_reuse.py
        if masked_loss:
            self.masked_loss = True

    def set_text_encoders(self, text_encoders):
        raise NotImplementedError

    def count_text_fields(self, text_encoder_outputs_cached: bool, weighted_captions: bool) -> int:
        raise NotImplementedError

    def get_text_cond(self, text_fields):
        raise NotImplementedError

    def call_unet(self, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw):
        raise NotImplementedError

    def construct(self, *inputs):
        """mindone's TrainStep.construct, without its `if sync_gradients` branch when nothing accumulates: that
        branch makes a graph loaded from MindSpore's compile cache fail on its first step (measured, MS 2.10).
        Without accumulation the outputs end with whether every gradient was finite (the trainer stops on False)."""
        if self.accumulating:
            # named, not super(): graph mode resolves super() from type(self), which for a subclass is this method
            return TrainStep.construct(self, *inputs)
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
        masks, noise_draws = (rest[4], rest[5:]) if self.masked_loss else (None, rest[4:])

        if self.latents_cached:
            latents = pixels_or_latents
        else:
            mean, logvar = self.vae.encode(pixels_or_latents.astype(self.vae_dtype))
            latents = ops.stop_gradient(sample_diagonal_gaussian(mean, logvar)).astype(ms.float32)
        latents = latents * self.vae_scale_factor

        if self.text_encoder_outputs_cached:
            text_conds = text_fields
        else:
            text_conds = self.get_text_cond(text_fields)
            if not self.train_text_encoder:
                text_conds = ops.stop_gradient(text_conds)

        noise, noisy_latents, timesteps = self.noise_and_loss.noisy_latents_from_draws(latents, noise_draws)
        model_pred = self.call_unet(noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts,
                                    target_sizes_hw)
        target = self.noise_and_loss.get_target(latents, noise, timesteps)
        loss = self.noise_and_loss.compute_loss(model_pred, target, timesteps, loss_weights, masks)
        return self.scale_loss(loss), loss


def sd_get_text_cond(text_encoder, input_ids, clip_skip, weight_dtype, token_weights=None):
    """The SD 1.x / 2.x conditioning (B, L, C) as training uses it, optionally weighted per token."""
    hidden_states = encode_tokens_sd(text_encoder, input_ids, clip_skip)
    if token_weights is not None:
        hidden_states = apply_token_weights(hidden_states, token_weights)
    return hidden_states.astype(weight_dtype)


class TrainStepForSDLoRA(TrainStepForLoRA):
    """The SD 1.x / 2.x step: one text encoder (ids, with --weighted_captions also their weights; `clip_skip` as
    upstream), `unet(noisy_latents, timesteps, hidden_states)`; the size fields of the batch are not used."""

    def __init__(self, *args, clip_skip=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_skip = clip_skip

    def set_text_encoders(self, text_encoders):
        (self.text_encoder,) = text_encoders

    def count_text_fields(self, text_encoder_outputs_cached: bool, weighted_captions: bool) -> int:
        return 2 if weighted_captions else 1

    def get_text_cond(self, text_fields):
        token_weights = text_fields[1] if self.num_text_fields == 2 else None
        return sd_get_text_cond(self.text_encoder, text_fields[0], self.clip_skip, self.weight_dtype, token_weights)

    def call_unet(self, noisy_latents, timesteps, text_conds, original_sizes_hw, crop_top_lefts, target_sizes_hw):
        return self.unet(noisy_latents.astype(self.weight_dtype), timesteps, text_conds.astype(self.weight_dtype))


class NetworkTrainer:
    """The generic loop, with SD 1.x / 2.x's hooks; a model family overrides the hooks (tuple inputs and outputs,
    see the seed doc)."""

    is_sdxl = False
    vae_scale_factor = VAE_SCALE_FACTOR
    model_version_metadata = "sd_v1"  # ss_base_model_version; load_target_model sets it from --v2 / --v_param...
    train_step_class = TrainStepForSDLoRA
    latents_npz_suffix = caching.SD_LATENTS_NPZ_SUFFIX

    # ----- hooks of a model family ---------------------------------------------------------------------------

    def assert_extra_args(self, args, train_dataset_group):
        verify_sd_training_args(args)
        train_dataset_group.verify_bucket_reso_steps(64)
        train_dataset_group.num_text_encoders = 1  # batches carry one token-id field

    def load_target_model(self, args, weight_dtype):
        """-> (text_encoders tuple, vae, unet)."""
        text_encoder, vae, unet = load_sd_models(args)
        check_clip_skip(text_encoder, args.clip_skip)
        self.model_version_metadata = model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization)
        return (text_encoder,), vae, unet

    def load_tokenizer(self, args):
        return SdTokenizeStrategy(args.v2, args.max_token_length, args.tokenizer_cache_dir)

    def cache_latents(self, args, vae, dataset_group):
        vae_dtype = vae_dtype_for(args)

        def encode(images: np.ndarray) -> np.ndarray:
            mean, logvar = vae.encode(ms.Tensor(images, vae_dtype))
            return sample_diagonal_gaussian(mean, logvar).asnumpy().astype(np.float32)

        caching.cache_latents(
            dataset_group, encode, args.vae_batch_size, args.cache_latents_to_disk, args.skip_cache_check,
            **cache_sharding(args.cache_latents_to_disk), npz_suffix=self.latents_npz_suffix,
        )

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_group, tokenize_strategy):
        # upstream's train_network.py has no such flag for SD 1.x / 2.x (setup_parser sets it off)
        raise NotImplementedError("text-encoder output caching is SDXL's (sdxl_train_network.py)")

    def train_step_kwargs(self, args) -> dict:
        """The family's own keyword arguments of `train_step_class`."""
        return {"clip_skip": args.clip_skip}

    def build_train_step(self, args, network, optimizer, text_encoders, vae, unet, dataset_group, weight_dtype):
        latents_cached = bool(args.cache_latents)
        return self.train_step_class(
            network, optimizer, unet, text_encoders, None if latents_cached else vae,
            DiffusionNoiseAndLoss.from_args(args),
            latents_cached=latents_cached,
            text_encoder_outputs_cached=bool(args.cache_text_encoder_outputs),
            train_text_encoder=not args.network_train_unet_only,
            weight_dtype=weight_dtype,
            vae_dtype=vae_dtype_for(args),
            vae_scale_factor=self.vae_scale_factor,
            max_grad_norm=args.max_grad_norm or None,  # Kohya's 0 means "no clipping"
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            length_of_dataloader=distributed.batches_per_rank(len(dataset_group), distributed.get_state().world_size),
            weighted_captions=dataset_group.weighted_captions,
            masked_loss=dataset_group.with_masks,
            **self.train_step_kwargs(args),
        )

    def build_sample_pipeline(self, args, text_encoders, vae, unet, tokenize_strategy, weight_dtype):
        """The pipeline `library.sample_images.sample_images` generates with: the models as they are in training."""
        return SdPipeline.from_models(*text_encoders, vae, unet, tokenize_strategy, dtype=weight_dtype,
                                      vae_dtype=vae_dtype_for(args), v_parameterization=args.v_parameterization,
                                      clip_skip=args.clip_skip)

    def get_sai_model_spec(self, args, timestamp):
        """The `modelspec.*` metadata of a LoRA file."""
        return sai_model_spec.get_sai_model_spec(args, lora=True, timestamp=timestamp, sdxl=self.is_sdxl)

    def network_targets(self, text_encoders, unet):
        """(vae, text_encoders list, unet) as create_network expects them."""
        return None, list(text_encoders), unet

    # ----- the loop --------------------------------------------------------------------------------------------

    def train(self, args):
        # under msrun: join the process group first (the scheduler process stops here), see library/distributed.py
        dist = distributed.init_distributed()
        session_id = random.randint(0, 2**32 - 1)
        training_started_at = time.time()
        train_util.check_unsupported_flags(args, logger.info)
        train_util.verify_training_args(args)
        check_logging_args(args)
        check_offset_args(args)
        validation.verify_validation_args(args)
        sample_prompts = check_sample_prompts(args.sample_prompts, args.sample_sampler)
        train_util.check_output_paths(args)
        if dist.is_main_process and args.output_dir:
            train_state.remove_interrupted_saves(args.output_dir)
        config_util.prepare_dataset_args(args)
        if args.seed is None:
            args.seed = distributed.gather_json(random.randint(0, 2**32 - 1))[0]  # rank 0's: one seed for all ranks
        set_seed(args.seed)

        # datasets first: a bad config fails before any model loads
        tokenize_strategy = self.load_tokenizer(args)
        # the validation group: the images a validation_split held out (None without one), never trained on
        train_group, validation_group = config_util.build_dataset_groups(args, tokenize_strategy)
        if args.debug_dataset:
            debug_dataset(train_group)
            return None
        if len(train_group) == 0:
            raise ValueError("no training images found: check --train_data_dir / --dataset_config")
        if args.cache_latents and not train_group.is_latent_cacheable():
            raise ValueError("when caching latents, either color_aug or random_crop cannot be used")
        self.assert_extra_args(args, train_group)
        if validation_group is not None:
            self.assert_extra_args(args, validation_group)
        network_module = import_network_module(args.network_module)
        net_kwargs = train_util.parse_network_args(args.network_args)
        optimizers.resolve_optimizer_type(args)
        if args.lr_scheduler not in lr_schedulers.SUPPORTED_SCHEDULERS:
            raise ValueError(f"--lr_scheduler {args.lr_scheduler}: use one of {', '.join(lr_schedulers.SUPPORTED_SCHEDULERS)}")

        configure_mindspore(args)
        weight_dtype, save_dtype = prepare_dtype(args)
        text_encoders, vae, unet = self.load_target_model(args, weight_dtype)
        # base weights in the training dtype (LoRA weights stay fp32 unless --full_fp16/bf16), VAE per --no_half_vae
        for model in (unet, *text_encoders):
            cast_parameters(model, weight_dtype)
        cast_parameters(vae, vae_dtype_for(args))
        self.text_encoders, self.vae, self.unet = text_encoders, vae, unet  # kept for inspection after train()

        for group in (train_group, validation_group):
            if group is None:
                continue
            if args.cache_latents:
                self.cache_latents(args, vae, group)
            if args.cache_text_encoder_outputs:
                self.cache_text_encoder_outputs(args, text_encoders, group, tokenize_strategy)
        distributed.barrier()  # disk caches are split across ranks: none reads a file before it is written

        # the LoRA's initial weights depend on the seed alone, not on what ran before: MindSpore's initializers draw
        # from numpy's global generator, which compiling and caching also touch (a run that finds its disk caches
        # made would otherwise start from other weights than the run that made them)
        set_seed(args.seed)
        network = self.create_network(args, network_module, net_kwargs, text_encoders, vae, unet)
        if args.full_fp16 or args.full_bf16:
            for param in network.get_trainable_params():
                param.set_dtype(weight_dtype)
        self.network = network
        if args.gradient_checkpointing:
            unet.set_gradient_checkpointing(True)
            for te in text_encoders:
                te.set_gradient_checkpointing(True)
        # what the caches replace leaves memory (upstream moves it off the GPU), unless sample images need it; the
        # network holds no text-encoder layer here (caching text-encoder outputs means --network_train_unet_only)
        if not sample_prompts:
            if args.cache_latents:
                vae = None
            if args.cache_text_encoder_outputs:
                text_encoders = (None,) * len(text_encoders)
            self.text_encoders, self.vae = text_encoders, vae
            host_memory.free_unreferenced_memory()

        text_encoder_lr = args.text_encoder_lr[0] if isinstance(args.text_encoder_lr, list) else args.text_encoder_lr
        param_groups, lr_descriptions = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
        optimizer_name, optimizer_args, optimizer = optimizers.get_optimizer(args, param_groups)

        # epoch arithmetic as upstream: one optimizer step per gradient_accumulation_steps batches of this rank.
        # With N ranks, rank r runs batches r, r+N, ... of each epoch; the uneven remainder is dropped (every rank
        # must run the same number of steps), so num_batches_per_epoch is the per-rank count, as upstream's
        # len(train_dataloader) after accelerator.prepare.
        num_batches_per_epoch = distributed.batches_per_rank(len(train_group), dist.world_size)
        num_update_steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * num_update_steps_per_epoch
            logger.info("max_train_steps = %d (from --max_train_epochs %d)", args.max_train_steps, args.max_train_epochs)
        num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
        if args.save_n_epoch_ratio is not None and args.save_n_epoch_ratio > 0:
            args.save_every_n_epochs = math.floor(num_train_epochs / args.save_n_epoch_ratio) or 1
        train_group.set_max_train_steps(args.max_train_steps)
        # schedule-free optimizers schedule themselves (upstream gives them a scheduler that does nothing) and keep
        # two sets of weights: the evaluation set is in place while saving, sampling and validating
        if optimizers.is_schedulefree_optimizer(optimizer):
            lr_scheduler = optimizers.get_dummy_scheduler(optimizer)
        else:
            lr_scheduler = lr_schedulers.get_scheduler_fix(args, optimizer)
        optimizer_train_mode, optimizer_eval_mode = optimizers.get_optimizer_train_eval_fn(optimizer)

        train_step = self.build_train_step(args, network, optimizer, text_encoders, vae, unet, train_group, weight_dtype)
        noise_sampler = NoiseSampler(args, seed=args.seed, rank=dist.rank)  # one noise stream per rank
        # every batch field is per sample; one graph for all buckets unless --static_shapes
        compiled_step = CompiledStep(
            train_step, per_sample=(True,) * len(train_group.batch_fields) + noise_sampler.per_sample,
            static_shapes=args.static_shapes, compile_cache_dir=args.compile_cache_dir,
        )
        self.compiled_step = compiled_step  # kept for inspection after train() (number of compiles)
        # the same forward without backward, on fixed timesteps and noise (compiled at its first evaluation)
        validator = validation.Validation.create(
            args, train_step, validation_group, network, rank=dist.rank, world_size=dist.world_size,
            show_progress=dist.is_main_process, optimizer_eval_fn=optimizer_eval_mode,
            optimizer_train_fn=optimizer_train_mode,
        )
        self.validator = validator

        resumed_step = None
        if args.resume:
            resumed_step, resumed_epoch = train_state.load_state(
                args.resume, network, optimizer, lr_scheduler, noise_sampler, num_update_steps_per_epoch,
                world_size=dist.world_size, rank=dist.rank,
            )
            optimizer_train_mode()
            logger.info("resumed from %s at step %d (epoch %d)", args.resume, resumed_step, resumed_epoch + 1)
        # the step count, epoch and batch to start at (--resume, --initial_step/epoch, --skip_until_initial_step)
        start = start_position(
            num_batches_per_epoch=num_batches_per_epoch, gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_train_steps=args.max_train_steps, initial_step=args.initial_step, initial_epoch=args.initial_epoch,
            skip_until_initial_step=args.skip_until_initial_step, resumed_step=resumed_step,
        )
        global_step, first_epoch = start.global_step, start.first_epoch
        if start.global_step > 0:
            logger.info("starting at step %d in epoch %d (skipping %d batches of it)", start.global_step,
                        start.first_epoch + 1, start.skip_batches)

        metadata = build_training_metadata(
            args, session_id, training_started_at, train_group, network, optimizer_name, optimizer_args,
            num_batches_per_epoch, num_train_epochs, self.model_version_metadata, num_processes=dist.world_size,
        )
        metadata.update(validation.validation_metadata(args, validation_group))
        minimum_metadata = {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}
        os.makedirs(args.output_dir, exist_ok=True)

        # only rank 0 writes files (LoRA, state, logs) and shows progress; the other ranks run silently
        def save_model(file_name, steps, epoch_no, force_sync_upload=False):
            path = os.path.join(args.output_dir, file_name)
            if not dist.is_main_process:
                return path
            md = minimum_metadata if args.no_metadata else metadata
            md = dict(md)
            md["ss_training_finished_at"] = str(time.time())
            md["ss_steps"] = str(steps)
            md["ss_epoch"] = str(epoch_no)
            md.update(self.get_sai_model_spec(args, training_started_at))
            optimizer_eval_mode()
            network.save_weights(path, save_dtype, md)
            optimizer_train_mode()
            logger.info("saved %s", path)
            return path

        def remove_model(file_name):
            path = os.path.join(args.output_dir, file_name)
            if dist.is_main_process and os.path.exists(path):
                os.remove(path)

        def save_state(name):  # collective: every rank calls it (rank 0 gathers the ranks' noise streams)
            optimizer_eval_mode()
            train_state.save_state(
                os.path.join(args.output_dir, name), network, optimizer, lr_scheduler, noise_sampler,
                epoch=current_epoch, step=global_step, world_size=dist.world_size, is_main_process=dist.is_main_process,
            )
            optimizer_train_mode()

        def remove_state(name):
            if dist.is_main_process:
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)

        logger.info(
            "running training: %d images (%d reg), %d batches per epoch, %d epochs, "
            "gradient accumulation %d, total optimization steps %d",
            train_group.num_train_images, train_group.num_reg_images, num_batches_per_epoch, num_train_epochs,
            args.gradient_accumulation_steps, args.max_train_steps,
        )
        tracker = TrainingLogger(args, enabled=dist.is_main_process)
        sample_pipeline = None

        def sample(epoch_no):
            """Sample images if upstream's schedule says so (epoch_no: None after a step, else the epoch number):
            rank 0 generates while the others wait, with the network as it is (applied, not merged)."""
            nonlocal sample_pipeline
            if not sample_prompts or not should_sample(
                    global_step, epoch_no, sample_at_first=args.sample_at_first,
                    every_n_steps=args.sample_every_n_steps, every_n_epochs=args.sample_every_n_epochs):
                return
            if dist.is_main_process:
                if sample_pipeline is None:
                    sample_pipeline = self.build_sample_pipeline(args, text_encoders, vae, unet, tokenize_strategy,
                                                                 weight_dtype)
                optimizer_eval_mode()
                samples = sample_images(sample_pipeline, sample_prompts, args.output_dir, step=global_step,
                                        epoch=epoch_no, output_name=args.output_name,
                                        default_sampler=args.sample_sampler, progress=True)
                optimizer_train_mode()
                tracker.log_images(samples, global_step)
            distributed.barrier()

        loss_recorder = train_util.LossRecorder()
        progress = tqdm(total=args.max_train_steps, initial=global_step, desc="steps", smoothing=0,
                        disable=not dist.is_main_process)
        network.set_train(True)
        output_name = args.output_name
        current_epoch = first_epoch
        skip_batches = start.skip_batches
        if skip_batches and args.gradient_accumulation_steps > 1:
            # mindone's accumulator counts the epoch's batches to step at its end: start it at the skipped ones
            train_step.grad_accumulator.batch_idx.set_data(ms.Tensor(skip_batches, ms.int64))
        stop = interrupts.StopRequest()  # Ctrl-C / SIGTERM: stop after the current step, save, exit (library/interrupts.py)
        stop.install()
        stopping = False  # what the ranks agreed on, not the local flag
        sample(0)  # --sample_at_first (and, on resume with --sample_every_n_epochs, as upstream)
        tracker.commit(0)  # wandb: the first samples' row, as upstream

        for epoch in range(first_epoch, num_train_epochs):
            current_epoch = epoch
            train_group.set_current_epoch(epoch + 1)
            logger.info("epoch %d/%d", epoch + 1, num_train_epochs)
            for batch_index in distributed.rank_batch_indices(len(train_group), dist.world_size, dist.rank):
                if skip_batches > 0:
                    skip_batches -= 1
                    continue
                train_group.set_current_step(global_step + 1)
                batch, details = train_group.get_batch(batch_index)
                noise_inputs = noise_sampler.draw(train_group.latent_shape(batch))
                outputs = compiled_step(*to_tensors(batch), *to_tensors(noise_inputs))
                loss_value = float(outputs[0].asnumpy()) * args.gradient_accumulation_steps
                grads_finite = bool(outputs[2].asnumpy()) if len(outputs) > 2 else True  # see TrainStepForSDXLLoRA
                if not (math.isfinite(loss_value) and grads_finite):
                    stop.uninstall()
                    progress.close()
                    tracker.close()  # what was logged so far stays readable
                    raise NonFiniteTrainingError(global_step + 1, epoch + 1, loss_value, details["image_key"])
                if not bool(train_step.sync_gradients.asnumpy()):
                    continue  # accumulating: no optimizer step yet

                global_step += 1
                lr_scheduler.step()
                logs = {"loss/current": loss_value}
                if args.scale_weight_norms:
                    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(args.scale_weight_norms)
                    logs.update({"max_norm/keys_scaled": keys_scaled, "norm/avg_key_norm": mean_norm,
                                 "max_norm/max_key_norm": max_norm})
                loss_recorder.add(batch_index // dist.world_size, loss_value)  # this rank's loss, as upstream logs
                logs["loss/average"] = loss_recorder.moving_average
                logs.update(lr_logs(lr_scheduler.get_last_lr(), lr_descriptions))
                logs.update(optimizers.d_lr_logs(optimizer, lr_descriptions))  # Prodigy / D-Adaptation's d*lr
                progress.update(1)
                progress.set_postfix(avr_loss=f"{loss_recorder.moving_average:.4f}", loss=f"{loss_value:.4f}",
                                     lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
                sample(None)  # before the step's logs: wandb puts the images in the step's row, as upstream
                tracker.log_step(logs, global_step, epoch + 1)

                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0 and global_step < args.max_train_steps:
                    save_model(train_util.get_step_ckpt_name(output_name, global_step), global_step, epoch + 1)
                    if args.save_state:
                        save_state(train_util.STEP_STATE_NAME.format(output_name or "at", global_step))
                    remove_no = train_util.get_remove_step_no(args, global_step)
                    if remove_no is not None:
                        remove_model(train_util.get_step_ckpt_name(output_name, remove_no))
                    remove_no = train_util.get_remove_step_no(args, global_step, args.save_last_n_steps_state)
                    if args.save_state and remove_no is not None:
                        remove_state(train_util.STEP_STATE_NAME.format(output_name or "at", remove_no))
                if validator is not None:
                    validation_logs = validator.after_step(global_step, epoch, loss_recorder.moving_average)
                    if validation_logs:
                        tracker.log_step(validation_logs, global_step, epoch + 1)
                if global_step >= args.max_train_steps:
                    break
                if stop.requested():
                    stopping = True
                    break

            if stopping:
                break
            if validator is not None:
                validation_logs = validator.after_epoch(epoch, loss_recorder.moving_average)
                if validation_logs:
                    tracker.log_epoch(validation_logs, global_step, epoch + 1)
            tracker.log_epoch({"loss/epoch_average": loss_recorder.moving_average}, global_step, epoch + 1)
            finished = global_step >= args.max_train_steps
            if finished:
                current_epoch = epoch + 1
            elif args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0 and epoch + 1 < num_train_epochs:
                current_epoch = epoch + 1
                save_model(train_util.get_epoch_ckpt_name(output_name, epoch + 1), global_step, epoch + 1)
                if args.save_state:
                    save_state(train_util.EPOCH_STATE_NAME.format(output_name or "epoch", epoch + 1))
                remove_no = train_util.get_remove_epoch_no(args, epoch + 1)
                if remove_no is not None:
                    remove_model(train_util.get_epoch_ckpt_name(output_name, remove_no))
            sample(epoch + 1)  # after the last epoch too, as upstream
            if finished:
                break
        stop.uninstall()
        progress.close()
        if stopping:
            saved = [save_model(train_util.get_step_ckpt_name(output_name, global_step), global_step, current_epoch + 1)]
            if args.save_state:
                state_name = train_util.STEP_STATE_NAME.format(output_name or "at", global_step)
                save_state(state_name)
                saved.append(os.path.join(args.output_dir, state_name))
            tracker.close()
            if dist.is_main_process:
                how = (f"continue with the same command and --resume {saved[1]}" if args.save_state else
                       f"the training state was not saved (add --save_state for that); --network_weights {saved[0]} "
                       "starts a new run from these weights")
                print(f"{stop.signal_name}: stopped after step {global_step} of {args.max_train_steps}; saved "
                      f"{' and '.join(saved)}; {how}", file=sys.stderr, flush=True)
            raise SystemExit(interrupts.EXIT_CODE)
        tracker.close()

        if args.save_state or args.save_state_on_train_end:
            save_state(train_util.LAST_STATE_NAME.format(output_name or "last"))
        final_path = save_model(train_util.get_last_ckpt_name(output_name), global_step, current_epoch)
        if dist.is_main_process:
            print(f"LoRA saved to {final_path}")
        return final_path

    def create_network(self, args, network_module, net_kwargs, text_encoders, vae, unet):
        """The LoRA network, its cells replaced in place inside the models, optionally loaded from a file."""
        _, te_list, unet_target = self.network_targets(text_encoders, unet)
        multipliers = args.base_weights_multiplier or []
        for i, path in enumerate(args.base_weights or []):
            multiplier = multipliers[i] if i < len(multipliers) else 1.0
            merger, weights_sd = network_module.create_network_from_weights(
                multiplier, path, vae, te_list, unet_target, for_inference=True
            )
            merger.merge_to(weights_sd)
            logger.info("--base_weights: merged %s (multiplier %g) into the base model", path, multiplier)
        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        if args.dim_from_weights:
            if not args.network_weights:
                raise ValueError("--dim_from_weights requires --network_weights")
            network, _ = network_module.create_network_from_weights(
                1.0, args.network_weights, vae, te_list, unet_target, **net_kwargs
            )
        else:
            if args.network_dropout is not None:
                net_kwargs.setdefault("dropout", args.network_dropout)
            network = network_module.create_network(
                1.0, args.network_dim, args.network_alpha, vae, te_list, unet_target,
                neuron_dropout=args.network_dropout, **net_kwargs,
            )
        network.apply_to(te_list, unet_target, train_text_encoder, train_unet)
        if args.network_weights:
            missing, unexpected = network.load_weights(args.network_weights)
            logger.info("loaded %s (missing %d, unexpected %d keys)", args.network_weights, len(missing), len(unexpected))
        return network


# ----- helpers ---------------------------------------------------------------------------------------------------


class NonFiniteTrainingError(ValueError):
    """The loss or the gradients of a step were NaN or inf: the run stops before the weights are saved."""

    def __init__(self, step: int, epoch: int, loss: float, image_keys):
        what = f"the loss is {loss}" if not math.isfinite(loss) else "the gradients are not finite"
        super().__init__(
            f"step {step} (epoch {epoch}): {what} (batch: {', '.join(image_keys)}); training stopped and nothing "
            "more was saved (files saved before this step are intact). Try a lower --learning_rate, "
            "--max_grad_norm, or --no_half_vae / --mixed_precision no"
        )


def verify_sd_training_args(args):
    """Upstream's SD 1.x / 2.x checks (warnings: both run upstream), before any model loads."""
    if args.v2 and args.clip_skip is not None:
        logger.warning("--v2 with --clip_skip will be unexpected: SD 2.x already uses the penultimate layer")
    if args.v_parameterization and not args.v2:
        logger.warning("--v_parameterization without --v2: the SD 1.x checkpoint must be a v-prediction model")


def load_sd_models(args):
    """(text_encoder, vae, unet) from `--pretrained_model_name_or_path` (a single-file SD 1.x, or with --v2 SD 2.x,
    checkpoint, or a diffusers model folder) and `--vae`."""
    path = args.pretrained_model_name_or_path
    if path is None:
        raise ValueError("--pretrained_model_name_or_path is required (a single-file SD 1.x/2.x .safetensors checkpoint "
                         "or a diffusers model folder)")
    text_encoder, vae, unet = model_util.load_sd_models(path, args.v2, "--pretrained_model_name_or_path")
    if args.vae:
        vae = sdxl_train_util.load_vae(args.vae, vae)  # the same VAE and file formats as SDXL's
    return text_encoder, vae, unet


def cache_sharding(to_disk: bool) -> dict:
    """Data parallel: disk caches are split (image i on rank i % N, the trainer waits for all before training);
    in-memory caches are built whole by every rank (a rank may read any image over the epochs), as upstream."""
    state = distributed.get_state()
    sharding = {"show_progress": state.is_main_process}
    if to_disk:
        sharding.update(num_processes=state.world_size, process_index=state.rank)
    return sharding


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    ms.set_seed(seed % 2**31)


def cast_parameters(model, dtype):
    for param in model.get_parameters():
        if param.dtype != dtype:
            param.set_dtype(dtype)


def configure_mindspore(args):
    """Graph mode on whatever backend this MindSpore build targets (the compile cache: library/graph_compile.py)."""
    ms.set_context(mode=ms.GRAPH_MODE)


def prepare_dtype(args):
    """(weight_dtype, save_dtype as numpy dtype or None). bf16 on CPU runs in fp32: the flags are rewritten to
    what runs, so ss_mixed_precision records it and the warning comes once (later calls see "no")."""
    import ml_dtypes

    if args.mixed_precision == "bf16" and ms.get_context("device_target") == "CPU":
        logger.warning("--mixed_precision bf16: MindSpore has no bf16 matmul on CPU; computing in fp32 instead")
        args.mixed_precision, args.full_bf16 = "no", False
    weight_dtype = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[args.mixed_precision]
    save_dtype = {None: None, "float": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}[args.save_precision]
    return weight_dtype, save_dtype


def vae_dtype_for(args):
    """fp32 with --no_half_vae (the SDXL VAE overflows in fp16), else the training dtype."""
    return ms.float32 if args.no_half_vae else prepare_dtype(args)[0]


def import_network_module(name):
    if name is None:
        raise ValueError("--network_module is required (networks.lora)")
    if name != "networks.lora":
        raise ValueError(f"--network_module {name}: only networks.lora is available in this port (LyCORIS etc. are not)")
    return importlib.import_module(name)


def to_tensors(arrays):
    return tuple(ms.Tensor(a) for a in arrays)


def lr_logs(lrs, descriptions):
    """`lr/<description>` per group (upstream's names: lr/textencoder, lr/unet, lr/unet plus, ...)."""
    logs = {}
    for i, lr in enumerate(lrs):
        name = descriptions[i] if i < len(descriptions) and descriptions[i] else f"group{i}"
        logs[f"lr/{name}"] = float(lr)
    return logs


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LoRA training (Kohya-compatible flags)")
    console.add_logging_arguments(parser)
    train_util.add_sd_models_arguments(parser)
    sai_model_spec.add_model_spec_arguments(parser)
    train_util.add_dataset_arguments(parser, True, True, True)
    train_util.add_training_arguments(parser)
    optimizers.add_optimizer_arguments(parser)
    validation.add_validation_arguments(parser)
    config_util.add_config_arguments(parser)
    train_util.add_config_file_arguments(parser)
    custom_train_functions.add_noise_and_loss_arguments(parser)
    custom_train_functions.add_custom_train_arguments(parser)
    custom_train_functions.add_masked_loss_arguments(parser)
    add_network_arguments(parser)
    # SD 1.x / 2.x has no text-encoder output caching, as upstream's train_network.py (no such flag: argparse
    # refuses it); sdxl_train_network adds the flags
    parser.set_defaults(cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=False)
    return parser


def add_network_arguments(parser):
    parser.add_argument("--no_metadata", action="store_true", help="do not save metadata in output model")
    parser.add_argument("--no_half_vae", action="store_true", help="do not use fp16/bf16 VAE in mixed precision")
    parser.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                        help="format to save the model (safetensors only)")
    parser.add_argument("--unet_lr", type=float, default=None, help="learning rate for U-Net")
    parser.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                        help="learning rate for text encoders (the first value is used for both)")
    parser.add_argument("--network_weights", type=str, default=None, help="pretrained weights for network")
    parser.add_argument("--network_module", type=str, default=None, help="network module to train (networks.lora)")
    parser.add_argument("--network_dim", type=int, default=None, help="network dimensions (rank)")
    parser.add_argument("--network_alpha", type=float, default=1, help="alpha for LoRA weight scaling")
    parser.add_argument("--network_dropout", type=float, default=None, help="neuron dropout on the LoRA down output")
    parser.add_argument("--network_args", type=str, default=None, nargs="*", help="additional arguments (k=v)")
    parser.add_argument("--network_train_unet_only", action="store_true", help="only train U-Net LoRA")
    parser.add_argument("--network_train_text_encoder_only", action="store_true", help="only train text encoder LoRA")
    parser.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")
    parser.add_argument("--dim_from_weights", action="store_true", help="dims and alphas from --network_weights")
    parser.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularization (e.g. 1.0)")
    parser.add_argument("--base_weights", type=str, default=None, nargs="*",
                        help="LoRA files merged into the base model before training")
    parser.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                        help="multipliers of --base_weights (default 1.0 each)")


def run(trainer: NetworkTrainer, parser: argparse.ArgumentParser, argv=None):
    """Parse the command line (and --config_file), then train; bad input ends with one line naming it."""
    args = parser.parse_args(argv)
    args = train_util.read_config_from_file(args, parser, argv)
    console.setup_logging(args)
    try:
        return trainer.train(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv=None):
    return run(NetworkTrainer(), setup_parser(), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
