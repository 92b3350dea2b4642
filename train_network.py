"""NetworkTrainer: Kohya's LoRA training loop on MindSpore, independent of the model family.

Read `NetworkTrainer.train` top to bottom: arguments -> seed -> datasets -> models -> caches -> network ->
optimizer and schedule -> graph-mode train step -> epochs and steps -> saves. A model family subclasses the
trainer (SDXL: `sdxl_train_network.SdxlNetworkTrainer`) and provides the model loading, tokenization, caching
encoders and `train_step_class`, the cell that runs forward and backward in one compiled graph.
"""

import argparse
import gc
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
from tqdm import tqdm  # noqa: E402

from library import config_util, custom_train_functions, lr_schedulers, optimizers, sai_model_spec  # noqa: E402
from library import distributed, train_state, train_util, validation  # noqa: E402
from library.datasets import debug_dataset  # noqa: E402
from library.graph_compile import CompiledStep  # noqa: E402
from library import interrupts  # noqa: E402
from library.lora_metadata import SS_METADATA_MINIMUM_KEYS, build_training_metadata  # noqa: E402
from library.noise_sampling import NoiseSampler  # noqa: E402
from library.sample_images import sample_images, should_sample  # noqa: E402
from library.sample_prompts import check_sample_prompts  # noqa: E402
from library.training_logger import TrainingLogger  # noqa: E402

logger = logging.getLogger(__name__)


class NetworkTrainer:
    """The generic loop. Subclasses override the hooks below (tuple inputs and outputs, see the seed doc)."""

    vae_scale_factor = 0.18215
    model_version_metadata = "sd_v1"  # ss_base_model_version
    train_step_class = None

    # ----- hooks of a model family ---------------------------------------------------------------------------

    def assert_extra_args(self, args, train_dataset_group):
        pass

    def load_target_model(self, args, weight_dtype):
        """-> (text_encoders tuple, vae, unet)."""
        raise NotImplementedError("train_network.py trains SDXL only here: use sdxl_train_network.py")

    def load_tokenizer(self, args):
        raise NotImplementedError

    def cache_latents(self, args, vae, dataset_group):
        raise NotImplementedError

    def cache_text_encoder_outputs(self, args, text_encoders, dataset_group, tokenize_strategy):
        raise NotImplementedError

    def build_train_step(self, args, network, optimizer, text_encoders, vae, unet, dataset_group, weight_dtype):
        raise NotImplementedError

    def build_sample_pipeline(self, args, text_encoders, vae, unet, tokenize_strategy, weight_dtype):
        """The pipeline `library.sample_images.sample_images` generates with: the models as they are in training."""
        raise NotImplementedError

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
            gc.collect()

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

        global_step, first_epoch = 0, 0
        if args.resume:
            global_step, first_epoch = train_state.load_state(
                args.resume, network, optimizer, lr_scheduler, noise_sampler, num_update_steps_per_epoch,
                world_size=dist.world_size, rank=dist.rank,
            )
            optimizer_train_mode()
            logger.info("resumed from %s at step %d (epoch %d)", args.resume, global_step, first_epoch + 1)

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
            md.update(sai_model_spec.get_sai_model_spec(args, lora=True, timestamp=training_started_at))
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
        skip_batches = (global_step - first_epoch * num_update_steps_per_epoch) * args.gradient_accumulation_steps
        stop = interrupts.StopRequest()  # Ctrl-C / SIGTERM: stop after the current step, save, exit (library/interrupts.py)
        stop.install()
        stopping = False  # what the ranks agreed on, not the local flag
        sample(0)  # --sample_at_first (and, on resume with --sample_every_n_epochs, as upstream)

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
                tracker.log(logs, global_step)
                sample(None)

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
                        tracker.log(validation_logs, global_step)
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
                    tracker.log(validation_logs, epoch + 1)
            tracker.log({"loss/epoch_average": loss_recorder.moving_average}, epoch + 1)
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
    add_network_arguments(parser)
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


def main(argv=None):
    raise SystemExit(
        "train_network.py trains SD 1.x/2.x models upstream; this port implements SDXL only: use sdxl_train_network.py"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
