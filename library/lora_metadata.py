"""The `ss_*` training metadata a LoRA file carries, with upstream's keys (all values are strings)."""

import hashlib
import json
import os

from library.dataset_metadata import dataset_metadata
from library.train_util import parse_network_args

SS_METADATA_MINIMUM_KEYS = (
    "ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
)


def build_training_metadata(args, session_id, training_started_at, train_group, network, optimizer_name,
                            optimizer_args, num_batches_per_epoch, num_train_epochs, base_model_version,
                            num_processes: int = 1) -> dict:
    text_encoder_lr = args.text_encoder_lr
    metadata = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": train_group.num_train_images,
        "ss_num_validation_images": 0,
        "ss_num_reg_images": train_group.num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_train_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_v2": bool(args.v2),
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": "sdxl-lora-mindspore",
        "ss_optimizer": optimizer_name + (f"({optimizer_args})" if optimizer_args else ""),
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": args.face_crop_aug_range,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_base_unet": False,
        "ss_validation_seed": None,
        "ss_validation_split": 0.0,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": None,
        "ss_validate_every_n_steps": None,
        "ss_resize_interpolation": args.resize_interpolation,
        "ss_num_processes": num_processes,
        "ss_total_batch_size": args.train_batch_size * num_processes * args.gradient_accumulation_steps,
    }
    from_config = args.dataset_config is not None
    if not from_config:
        metadata.update({
            "ss_batch_size_per_device": args.train_batch_size,
            "ss_resolution": args.resolution,
            "ss_color_aug": bool(args.color_aug),
            "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop),
            "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_keep_tokens": args.keep_tokens,
        })
    metadata.update(dataset_metadata(train_group, from_config))
    if args.network_args:
        metadata["ss_network_args"] = json.dumps(network_kwargs(args))
    # upstream hashes the base model (and VAE) file: the old webui hash and the full sha256
    if args.pretrained_model_name_or_path:
        metadata["ss_sd_model_name"] = model_name(args.pretrained_model_name_or_path)
        if os.path.isfile(args.pretrained_model_name_or_path):
            metadata["ss_sd_model_hash"] = model_hash(args.pretrained_model_name_or_path)
            metadata["ss_new_sd_model_hash"] = calculate_sha256(args.pretrained_model_name_or_path)
    if args.vae:
        metadata["ss_vae_name"] = model_name(args.vae)
        if os.path.isfile(args.vae):
            metadata["ss_vae_hash"] = model_hash(args.vae)
            metadata["ss_new_vae_hash"] = calculate_sha256(args.vae)
    return {key: str(value) for key, value in metadata.items()}


def network_kwargs(args) -> dict:
    """The kwargs upstream's train_network passes to create_network, which it stores as ss_network_args:
    --network_args split at the first '=' (values stay strings), plus "dropout": --network_dropout (None too)
    unless --network_args sets it or --dim_from_weights is given."""
    kwargs = parse_network_args(args.network_args)
    if not args.dim_from_weights and "dropout" not in kwargs:
        kwargs["dropout"] = args.network_dropout
    return kwargs


def model_hash(path: str) -> str:
    """stable-diffusion-webui's old model hash: sha256 of the 64 KiB at 1 MiB into the file, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def calculate_sha256(path: str) -> str:
    """stable-diffusion-webui's new model hash: sha256 of the whole file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_name(path: str) -> str:
    """Upstream stores the file name only, to keep local paths out of shared files."""
    return os.path.basename(path.rstrip("/\\"))
