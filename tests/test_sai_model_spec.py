"""modelspec.* keys and values for an SDXL LoRA, against the reference list (kohya_reference.md 4.6)."""

import argparse
import base64
import datetime

import pytest

from library import sai_model_spec

TS = 1700000000.25


def parse(argv):
    parser = argparse.ArgumentParser()
    sai_model_spec.add_model_spec_arguments(parser)
    for flag in ("--output_name", "--resolution"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--v_parameterization", action="store_true")
    for flag in ("--min_timestep", "--max_timestep", "--clip_skip"):
        parser.add_argument(flag, type=int, default=None)
    return parser.parse_args(argv)


def test_minimal_sdxl_lora():
    meta = sai_model_spec.get_sai_model_spec(parse(["--output_name", "my_lora", "--resolution", "1024,768"]), timestamp=TS)
    assert set(meta) == {
        "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
        "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.implementation_version",
    }
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(1700000000).isoformat()
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.implementation_version"].startswith("sdxl-lora-mindspore/")
    assert all(isinstance(v, str) for v in meta.values())


def test_defaults_without_name_or_resolution():
    meta = sai_model_spec.get_sai_model_spec(parse(["--v_parameterization"]), timestamp=TS)
    assert meta["modelspec.title"] == f"LoRA@{TS}"
    assert meta["modelspec.resolution"] == "1024x1024"  # SDXL default when only the TOML sets a resolution
    assert meta["modelspec.prediction_type"] == "v"
    checkpoint = sai_model_spec.build_metadata(v_parameterization=False, timestamp=TS, lora=False, reso=(896, 1152))
    assert checkpoint["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert checkpoint["modelspec.title"] == f"Checkpoint@{TS}" and checkpoint["modelspec.resolution"] == "896x1152"


def test_all_metadata_flags(tmp_path):
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(b"\x89PNG fake")
    argv = ["--output_name", "x", "--metadata_title", "Nice LoRA", "--metadata_author", "me",
            "--metadata_description", "desc", "--metadata_license", "MIT", "--metadata_tags", "a,b",
            "--metadata_usage_hint", "use it", "--metadata_thumbnail", str(thumb), "--metadata_merged_from", "m1, m2",
            "--metadata_trigger_phrase", "sks", "--metadata_preprocessor", "none", "--metadata_is_negative_embedding",
            "False", "--min_timestep", "100", "--clip_skip", "2", "--resolution", "1024"]
    meta = sai_model_spec.get_sai_model_spec(parse(argv), timestamp=TS)
    expected = {
        "modelspec.title": "Nice LoRA", "modelspec.author": "me", "modelspec.description": "desc",
        "modelspec.license": "MIT", "modelspec.tags": "a,b", "modelspec.usage_hint": "use it",
        "modelspec.merged_from": "m1, m2", "modelspec.trigger_phrase": "sks", "modelspec.preprocessor": "none",
        "modelspec.is_negative_embedding": "False", "modelspec.timestep_range": "100,1000",
        "modelspec.encoder_layer": "2", "modelspec.resolution": "1024x1024",
        "modelspec.thumbnail": "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode(),
    }
    assert {k: meta[k] for k in expected} == expected
    assert len(meta) == len(expected) + 6  # + spec version, architecture, implementation, date, prediction, version


def test_missing_thumbnail_is_dropped(caplog):
    meta = sai_model_spec.build_metadata(v_parameterization=False, timestamp=TS,
                                         optional_metadata={"thumbnail": "/no/such/file.png", "implementation_version": "v"})
    assert "modelspec.thumbnail" not in meta and meta["modelspec.implementation_version"] == "v"
    assert "metadata_thumbnail" in caplog.text


@pytest.mark.parametrize("argv,expected", [(["--max_timestep", "900"], "0,900"), (["--min_timestep", "0", "--max_timestep", "0"], "0,0")])
def test_timestep_range(argv, expected):
    assert sai_model_spec.get_sai_model_spec(parse(argv), timestamp=TS)["modelspec.timestep_range"] == expected
