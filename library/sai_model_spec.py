"""ModelSpec 1.0.1 metadata (`modelspec.*` keys) for SD 1.x/2.x and SDXL LoRA and checkpoint files, as upstream
writes it.

See https://github.com/Stability-AI/ModelSpec. Upstream's `sai_model_spec.build_metadata` covers many
model families; this port writes the SD 1.x/2.x and SDXL ones. As upstream, an SD 1.x/2.x LoRA names diffusers as
its implementation (its module names are diffusers'), an SDXL LoRA or any checkpoint Stability's generative-models. `modelspec.hash_sha256` is not written (upstream
leaves it as a TODO too). `modelspec.implementation_version` names this project and its git commit
instead of "sd-scripts/<commit>", so a file says which trainer produced it.
"""

import argparse
import base64
import datetime
import logging
import mimetypes
import os
import subprocess
import time

logger = logging.getLogger(__name__)

SPEC_VERSION = "1.0.1"
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = "stable-diffusion-xl-v1-base"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
PROJECT_NAME = "sdxl-lora-mindspore"

# --metadata_<name> flags beyond title/author/description/license/tags; written as modelspec.<name>
OPTIONAL_FIELDS = ("usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding")


def get_implementation_version():
    """'<project>/<git commit>' of this checkout, or '<project>/unknown' outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return f"{PROJECT_NAME}/unknown"
    commit = result.stdout.strip()
    return f"{PROJECT_NAME}/{commit if result.returncode == 0 and commit else 'unknown'}"


def file_to_data_url(path):
    mime_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime_type};base64,{base64.b64encode(f.read()).decode('ascii')}"


def architecture(v2: bool, v_parameterization: bool, sdxl: bool) -> str:
    """Upstream's `determine_architecture` for SD 1.x/2.x and SDXL (without the adapter suffix)."""
    if sdxl:
        return ARCH_SD_XL_V1_BASE
    if v2:
        return ARCH_SD_V2_768_V if v_parameterization else ARCH_SD_V2_512
    return ARCH_SD_V1


def _resolution(reso, default: int):
    # "1024,768", 1024, (1024,) or (1024, 768) -> "WxH"; without one, the family's default square
    if reso is None:
        return f"{default}x{default}"
    if isinstance(reso, str):
        reso = tuple(int(r) for r in reso.split(","))
    if isinstance(reso, int):
        reso = (reso,)
    if len(reso) == 1:
        reso = (reso[0], reso[0])
    return f"{reso[0]}x{reso[1]}"


def build_metadata(
    *,
    v_parameterization,
    v2=False,
    sdxl=True,
    timestamp,
    lora=True,
    title=None,
    reso=None,
    author=None,
    description=None,
    license=None,
    tags=None,
    merged_from=None,
    timesteps=None,
    clip_skip=None,
    optional_metadata=None,
):
    """modelspec.* dict (all values str) for a LoRA (lora=True) or checkpoint of SDXL (`sdxl`) or SD 1.x/2.x (`v2`).

    The resolution defaults to upstream's: 1024 for SDXL, 768 for SD2 with v-parameterization, else 512.
    timestamp: seconds since the epoch (the title fallback "LoRA@<timestamp>" and the local ISO date).
    timesteps: (min, max) when --min_timestep/--max_timestep was given. optional_metadata: extra
    fields (e.g. usage_hint, trigger_phrase); a thumbnail that is a file path becomes a data: URL.
    """
    if title is None:
        title = f"{'LoRA' if lora else 'Checkpoint'}@{timestamp}"
    metadata = {
        "modelspec.architecture": architecture(v2, v_parameterization, sdxl) + ("/lora" if lora else ""),
        "modelspec.implementation": IMPL_DIFFUSERS if lora and not sdxl else IMPL_STABILITY_AI,
        "modelspec.title": title,
        "modelspec.resolution": _resolution(reso, 1024 if sdxl else 768 if v2 and v_parameterization else 512),
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": license,
        "modelspec.tags": tags,
        "modelspec.merged_from": merged_from,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.timestep_range": None if timesteps is None else f"{timesteps[0]},{timesteps[1]}",
        "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
    }
    optional = dict(optional_metadata or {})
    thumbnail = optional.get("thumbnail")
    if thumbnail and not str(thumbnail).startswith("data:"):
        try:
            optional["thumbnail"] = file_to_data_url(thumbnail)
        except OSError as e:
            logger.warning(f"--metadata_thumbnail {thumbnail}: cannot read it ({e}); no thumbnail written")
            del optional["thumbnail"]
    optional.setdefault("implementation_version", get_implementation_version())
    for key, value in optional.items():
        metadata[key if key.startswith("modelspec.") else f"modelspec.{key}"] = value
    # TOML configs can give non-strings (e.g. is_negative_embedding = true); safetensors needs str
    return {key: str(value) for key, value in metadata.items() if value is not None}


def get_sai_model_spec(args, lora=True, timestamp=None, sdxl=True):
    """build_metadata from the parsed args, as upstream's `train_util.get_sai_model_spec` (SD 1.x/2.x: sdxl=False,
    then `--v2` and `--v_parameterization` choose the architecture)."""
    timesteps = None
    if args.min_timestep is not None or args.max_timestep is not None:
        timesteps = (args.min_timestep or 0, 1000 if args.max_timestep is None else args.max_timestep)
    optional = {name: getattr(args, f"metadata_{name}", None) for name in OPTIONAL_FIELDS}
    return build_metadata(
        v_parameterization=args.v_parameterization,
        v2=not sdxl and args.v2,
        sdxl=sdxl,
        timestamp=time.time() if timestamp is None else timestamp,
        lora=lora,
        title=args.metadata_title if args.metadata_title is not None else args.output_name,
        reso=args.resolution,
        author=args.metadata_author,
        description=args.metadata_description,
        license=args.metadata_license,
        tags=args.metadata_tags,
        timesteps=timesteps,
        clip_skip=args.clip_skip,
        optional_metadata={k: v for k, v in optional.items() if v is not None},
    )


def add_model_spec_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--metadata_title", type=str, default=None, help="title for model metadata (default is output_name)")
    parser.add_argument("--metadata_author", type=str, default=None, help="author name for model metadata")
    parser.add_argument("--metadata_description", type=str, default=None, help="description for model metadata")
    parser.add_argument("--metadata_license", type=str, default=None, help="license for model metadata")
    parser.add_argument("--metadata_tags", type=str, default=None, help="tags for model metadata, separated by comma")
    parser.add_argument("--metadata_usage_hint", type=str, default=None, help="usage hint for model metadata")
    parser.add_argument("--metadata_thumbnail", type=str, default=None,
                        help="thumbnail image as data URL or file path (converted to a data URL) for model metadata")
    parser.add_argument("--metadata_merged_from", type=str, default=None, help="source models for merged model metadata")
    parser.add_argument("--metadata_trigger_phrase", type=str, default=None, help="trigger phrase for model metadata")
    parser.add_argument("--metadata_preprocessor", type=str, default=None, help="preprocessor used for model metadata")
    parser.add_argument("--metadata_is_negative_embedding", type=str, default=None,
                        help="whether this is a negative embedding, for model metadata")
