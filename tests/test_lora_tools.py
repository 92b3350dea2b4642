"""LoRA tools: resize, SVD merge, LoRA merge (sum / concat), merge into a checkpoint, extraction, show_metadata.

Numbers are checked against numpy computations written here (SVD truncations, rank rules, sums of deltas); files
against upstream's keys and metadata; the checkpoint tools against the tiny SDXL config.
"""

import hashlib
import json
import re

import numpy as np
import pytest

from library import model_util, sdxl_model_util
from networks import (extract_lora_from_models, lora, lora_io, lora_tools, merge_lora, resize_lora,
                      sdxl_merge_lora, svd_merge_lora)
from tools import show_metadata
from tools.make_tiny_checkpoint import make_tiny_checkpoint

# weight shapes: Linear, conv 3x3, conv 1x1
SHAPES = {"lora_unet_a_to_q": (24, 16), "lora_unet_b_in_layers_2": (12, 8, 3, 3),
          "lora_unet_c_skip_connection": (10, 6, 1, 1)}


def random_lora(seed, rank, alpha, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        down_shape = (rank,) + shape[1:]
        up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
        tensors[f"{name}.lora_down.weight"] = rng.normal(0, 0.3, down_shape).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = rng.normal(0, 0.3, up_shape).astype(np.float32)
        tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return tensors


def delta(tensors, name):
    """alpha / rank * up @ down, written out with einsum in the weight's layout."""
    down = tensors[f"{name}.lora_down.weight"].astype(np.float64)
    up = tensors[f"{name}.lora_up.weight"].astype(np.float64)
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    if down.ndim == 2:
        return scale * np.einsum("or,ri->oi", up, down)
    return scale * np.einsum("or,rihw->oihw", up[:, :, 0, 0], down)


def svd_truncation(matrix, rank):
    shape = matrix.shape
    u, s, vh = np.linalg.svd(matrix.reshape(shape[0], -1).astype(np.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(shape)


def assert_close(actual, expected, rtol=1e-5):
    scale = max(np.abs(expected).max(), 1e-12)
    np.testing.assert_allclose(actual, expected, atol=rtol * scale, rtol=0)


def module_keys(names):
    return {f"{n}.{suffix}" for n in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}


def assert_sshs_hashes(path):
    """sshs_model_hash is the sha256 of the file's bytes after the header (upstream's addnet hash)."""
    with open(path, "rb") as f:
        data = f.read()
    header_len = int.from_bytes(data[:8], "little")
    metadata = lora_io.read_metadata(path)
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def write(path, tensors, metadata=None):
    lora_io.write_lora_file(str(path), tensors, metadata or {})
    return str(path)


# ------------------------------------------------------------------------------------------------ resize

def test_resize_to_full_rank_is_lossless():
    tensors = random_lora(0, rank=4, alpha=2.0)
    resized, infos = lora_tools.resize_lora(tensors, 4, 4, progress=False)
    assert set(resized) == set(tensors)
    for name in SHAPES:
        assert_close(delta(resized, name), delta(tensors, name))
        assert float(resized[f"{name}.alpha"]) == pytest.approx(2.0)
    assert all(info.fro_retained == pytest.approx(1.0) for info in infos)


def test_resize_equals_svd_truncation():
    tensors = random_lora(1, rank=6, alpha=3.0)
    resized, _ = lora_tools.resize_lora(tensors, new_rank=2, new_conv_rank=3, progress=False)
    expected_ranks = {"lora_unet_a_to_q": 2, "lora_unet_b_in_layers_2": 3, "lora_unet_c_skip_connection": 2}
    for name, rank in expected_ranks.items():
        down, up = resized[f"{name}.lora_down.weight"], resized[f"{name}.lora_up.weight"]
        assert down.shape == (rank,) + SHAPES[name][1:]
        assert up.shape == (SHAPES[name][0], rank) + ((1, 1) if len(SHAPES[name]) == 4 else ())
        assert float(resized[f"{name}.alpha"]) == pytest.approx(3.0 / 6 * rank)  # the old scale is kept
        assert_close(delta(resized, name), svd_truncation(delta(tensors, name), rank))


SINGULAR_VALUES = np.array([10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05])


def lora_with_spectrum(out_dim=16, in_dim=12):
    """A rank-8 Linear LoRA (alpha 8, scale 1) whose update has exactly SINGULAR_VALUES."""
    rng = np.random.default_rng(2)
    q_out, _ = np.linalg.qr(rng.normal(size=(out_dim, 8)))
    q_in, _ = np.linalg.qr(rng.normal(size=(in_dim, 8)))
    return {"lora_unet_m.lora_down.weight": q_in.T.astype(np.float32),
            "lora_unet_m.lora_up.weight": (q_out * SINGULAR_VALUES).astype(np.float32),
            "lora_unet_m.alpha": np.asarray(8.0, np.float32)}


def upstream_rank(method, param, max_rank, n=12):
    """Upstream's rule written as loops: the count of kept values, clamped to [1, n - 1], plus one, capped."""
    s = list(SINGULAR_VALUES) + [0.0] * (n - len(SINGULAR_VALUES))
    if method == "sv_ratio":
        count = sum(1 for v in s if v > s[0] / param)
    else:
        values, target = (s, param) if method == "sv_cumulative" else ([v * v for v in s], param * param)
        total, running = sum(values), 0.0
        for count, v in enumerate(values, start=1):
            running += v
            if running / total >= target:
                break
    return min(max(1, min(count, n - 1)) + 1, max_rank)


@pytest.mark.parametrize("method,param,max_rank,by_hand", [
    ("sv_ratio", 4.0, 8, 3),  # 10 and 5 are above 10 / 4, plus upstream's extra rank
    ("sv_ratio", 1000.0, 6, 6),  # all eight are kept, capped at --new_rank
    ("sv_cumulative", 0.9, 8, 4),  # cumsum / sum: 0.53, 0.80, 0.90 -> 3 values, plus one
    ("sv_fro", 0.9, 8, 3),  # squares: 100 / 130.3 = 0.77, 125 / 130.3 = 0.96 >= 0.81 -> 2 values, plus one
])
def test_dynamic_rank_selection(method, param, max_rank, by_hand):
    tensors = lora_with_spectrum()
    assert upstream_rank(method, param, max_rank) == by_hand
    resized, infos = lora_tools.resize_lora(tensors, max_rank, None, method, param, progress=False)
    assert infos[0].new_rank == by_hand
    assert resized["lora_unet_m.lora_down.weight"].shape == (by_hand, 12)
    assert float(resized["lora_unet_m.alpha"]) == pytest.approx(by_hand)  # scale 1 * rank
    assert_close(delta(resized, "lora_unet_m"), svd_truncation(delta(tensors, "lora_unet_m"), by_hand))
    s = SINGULAR_VALUES
    assert infos[0].fro_retained == pytest.approx(np.sqrt(np.sum(s[:by_hand] ** 2) / np.sum(s ** 2)), rel=1e-6)


def test_zero_module_gets_rank_one():
    tensors = lora_with_spectrum()
    tensors["lora_unet_m.lora_up.weight"][:] = 0
    resized, _ = lora_tools.resize_lora(tensors, 4, None, "sv_fro", 0.9, progress=False)
    assert resized["lora_unet_m.lora_down.weight"].shape[0] == 1
    assert not np.any(delta(resized, "lora_unet_m"))


def test_resize_cli_file_and_metadata(tmp_path, capsys):
    source = write(tmp_path / "in.safetensors", random_lora(3, rank=4, alpha=2.0),
                   {"ss_training_comment": "my run", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                    "modelspec.title": "in"})
    out = str(tmp_path / "out.safetensors")
    resize_lora.main(["--model", source, "--save_to", out, "--new_rank", "2", "--save_precision", "fp16",
                      "--verbose"])
    tensors, metadata = lora_io.read_lora_file(out)
    assert set(tensors) == module_keys(SHAPES)
    assert all(value.dtype == np.float16 for value in tensors.values())
    assert metadata["ss_training_comment"] == "dimension is resized from 4 to 2; my run"
    assert metadata["ss_network_dim"] == "2"
    assert metadata["ss_network_alpha"] == "1.0"  # alpha 2 / rank 4 * 2
    assert metadata["modelspec.title"] == "in"  # other entries are kept
    assert_sshs_hashes(out)
    report = capsys.readouterr().out
    assert "lora_unet_a_to_q" in report and "fro retained" in report
    assert "Average Frobenius norm retention" in report

    resize_lora.main(["--model", source, "--save_to", out, "--new_rank", "4", "--dynamic_method", "sv_ratio",
                      "--dynamic_param", "2"])
    metadata = lora_io.read_metadata(out)
    assert metadata["ss_training_comment"] == "Dynamic resize with sv_ratio: 2.0 from 4; my run"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"


def test_resize_cli_errors(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit, match=f"error: LoRA weights not found: {missing}"):
        resize_lora.main(["--model", missing, "--save_to", str(tmp_path / "o.safetensors")])
    source = write(tmp_path / "in.safetensors", random_lora(3, rank=4, alpha=2.0))
    with pytest.raises(SystemExit, match="--dynamic_method needs --dynamic_param"):
        resize_lora.main(["--model", source, "--save_to", str(tmp_path / "o.safetensors"),
                          "--dynamic_method", "sv_fro"])
    with pytest.raises(SystemExit, match="--save_to must name a .safetensors file"):
        resize_lora.main(["--model", source, "--save_to", str(tmp_path / "o.ckpt")])
    broken = random_lora(3, rank=4, alpha=2.0)
    del broken["lora_unet_a_to_q.lora_up.weight"]
    broken_path = write(tmp_path / "broken.safetensors", broken)
    with pytest.raises(SystemExit, match=f"error: {broken_path}: module lora_unet_a_to_q has a lora_down.weight "
                                         "but no lora_up.weight"):
        resize_lora.main(["--model", broken_path, "--save_to", str(tmp_path / "o.safetensors")])


# ------------------------------------------------------------------------------------------------ svd merge

def two_loras():
    a = random_lora(4, rank=3, alpha=1.5)
    b = random_lora(5, rank=2, alpha=4.0, shapes={k: v for k, v in SHAPES.items() if "skip" not in k})
    return a, b


def test_svd_merge_at_full_rank_is_the_sum_of_deltas():
    a, b = two_loras()
    merged = lora_tools.svd_merge_loras([("a", a, 0.7), ("b", b, -0.4)], new_rank=5, new_conv_rank=5,
                                        clamp_quantile=None, progress=False)
    assert set(merged) == module_keys(SHAPES)
    for name in SHAPES:
        expected = 0.7 * delta(a, name) + (-0.4 * delta(b, name) if name in {"lora_unet_a_to_q",
                                                                               "lora_unet_b_in_layers_2"} else 0)
        assert_close(delta(merged, name), expected)
        assert float(merged[f"{name}.alpha"]) == 5


def test_svd_merge_to_lower_rank_is_the_truncated_sum():
    a, b = two_loras()
    merged = lora_tools.svd_merge_loras([("a", a, 1.0), ("b", b, 1.0)], new_rank=2, clamp_quantile=None,
                                        progress=False)
    for name in ("lora_unet_a_to_q", "lora_unet_b_in_layers_2"):
        assert_close(delta(merged, name), svd_truncation(delta(a, name) + delta(b, name), 2))


def test_svd_merge_cli_file_and_metadata(tmp_path):
    a, b = two_loras()
    path_a = write(tmp_path / "a.safetensors", a, {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
                                                   "modelspec.title": "Style A"})
    path_b = write(tmp_path / "b.safetensors", b)
    out = str(tmp_path / "merged.safetensors")
    svd_merge_lora.main(["--models", path_a, path_b, "--ratios", "1", "1", "--new_rank", "4", "--new_conv_rank", "2",
                         "--save_to", out, "--save_precision", "bf16"])
    tensors, metadata = lora_io.read_lora_file(out)
    assert set(tensors) == module_keys(SHAPES)
    assert tensors["lora_unet_b_in_layers_2.lora_down.weight"].shape == (2, 8, 3, 3)
    assert tensors["lora_unet_a_to_q.lora_up.weight"].dtype == np.dtype("bfloat16")
    assert {k: v for k, v in metadata.items() if k.startswith("ss_")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4",
        "ss_network_args": json.dumps({"conv_dim": 2, "conv_alpha": 2}), "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0"}
    assert metadata["modelspec.merged_from"] == "Style A, b"
    assert metadata["modelspec.title"] == "merged"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert_sshs_hashes(out)
    # the factors are those of the plain SVD merge clipped at +-(the 0.99 quantile of all their values), as upstream
    plain = lora_tools.svd_merge_loras([(path_a, a, 1.0), (path_b, b, 1.0)], 4, 2, clamp_quantile=None,
                                       progress=False)
    for name in SHAPES:
        down, up = plain[f"{name}.lora_down.weight"], plain[f"{name}.lora_up.weight"]
        high = np.quantile(np.concatenate([down.ravel(), up.ravel()]), 0.99)
        for key, factor in ((f"{name}.lora_down.weight", down), (f"{name}.lora_up.weight", up)):
            np.testing.assert_allclose(tensors[key].astype(np.float32), np.clip(factor, -high, high), rtol=1e-2,
                                       atol=1e-3 * high)

    with pytest.raises(SystemExit, match="--ratios needs one value per model: 2 models, 1 ratios"):
        svd_merge_lora.main(["--models", path_a, path_b, "--ratios", "1", "--save_to", out])


# ------------------------------------------------------------------------------------------------ LoRA merge

def test_concat_merge_equals_applying_both():
    a, b = two_loras()
    merged = lora_tools.merge_loras([("a", a, 1.0), ("b", b, 1.0)], concat=True, progress=False)
    weight = np.random.default_rng(6).normal(size=SHAPES["lora_unet_a_to_q"])
    name = "lora_unet_a_to_q"
    assert merged[f"{name}.lora_down.weight"].shape == (5, 16)
    assert float(merged[f"{name}.alpha"]) == 1.5  # the first file's alpha, as upstream
    assert_close(weight + delta(merged, name), weight + delta(a, name) + delta(b, name))
    assert_close(delta(merged, "lora_unet_b_in_layers_2"),
                 delta(a, "lora_unet_b_in_layers_2") + delta(b, "lora_unet_b_in_layers_2"))
    assert_close(delta(merged, "lora_unet_c_skip_connection"), delta(a, "lora_unet_c_skip_connection"))

    # a ratio multiplies both factors (upstream): LoRA b with ratio -0.5 enters as -0.25 * delta
    merged = lora_tools.merge_loras([("a", a, 1.0), ("b", b, -0.5)], concat=True, progress=False)
    assert_close(delta(merged, name), delta(a, name) - 0.25 * delta(b, name))


def test_same_rank_merge_is_upstreams_weighted_sum():
    a = random_lora(7, rank=3, alpha=1.5)
    b = random_lora(8, rank=3, alpha=3.0)
    merged = lora_tools.merge_loras([("a", a, 0.8), ("b", b, -0.6)], progress=False)
    for name in SHAPES:
        # up = sum sqrt(alpha_i / alpha_a) * |ratio_i| * up_i, down the same with ratio_i's sign, alpha = alpha_a
        factors = [np.sqrt(1.5 / 1.5) * 0.8, np.sqrt(3.0 / 1.5) * -0.6]
        up = sum(abs(f) * t[f"{name}.lora_up.weight"] for f, t in zip(factors, (a, b)))
        down = sum(f * t[f"{name}.lora_down.weight"] for f, t in zip(factors, (a, b)))
        expected = delta({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                          f"{name}.alpha": np.float32(1.5)}, name)
        assert_close(delta(merged, name), expected)
    # one input alone is reproduced exactly, with strength ratio * |ratio|
    alone = lora_tools.merge_loras([("b", b, 0.5)], progress=False)
    for name in SHAPES:
        assert_close(delta(alone, name), 0.25 * delta(b, name))


def test_shuffle_keeps_the_update():
    a, b = two_loras()
    plain = lora_tools.merge_loras([("a", a, 1.0), ("b", b, 1.0)], concat=True, progress=False)
    shuffled = lora_tools.merge_loras([("a", a, 1.0), ("b", b, 1.0)], concat=True, shuffle=True,
                                      rng=np.random.default_rng(0), progress=False)
    name = "lora_unet_a_to_q"
    assert not np.array_equal(plain[f"{name}.lora_down.weight"], shuffled[f"{name}.lora_down.weight"])
    assert_close(delta(shuffled, name), delta(plain, name))


def test_lora_merge_cli_file_and_metadata(tmp_path):
    a, b = two_loras()
    path_a = write(tmp_path / "a.safetensors", a, {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"})
    path_b = write(tmp_path / "b.safetensors", b)
    out = str(tmp_path / "concat.safetensors")
    sdxl_merge_lora.main(["--models", path_a, path_b, "--ratios", "1", "1", "--concat", "--shuffle",
                          "--save_to", out, "--save_precision", "fp16"])
    tensors, metadata = lora_io.read_lora_file(out)
    assert set(tensors) == module_keys(SHAPES)
    assert {k: v for k, v in metadata.items() if k.startswith("ss_")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "Dynamic", "ss_network_alpha": "1.5",
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}  # ranks 5 (concatenated) and 3 (a only)
    assert metadata["modelspec.merged_from"] == "a, b"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert_sshs_hashes(out)

    # different ranks cannot be summed: a one-line error naming the file and the module
    with pytest.raises(SystemExit, match=f"error: {path_b}: module lora_unet_a_to_q has rank 2, {path_a} rank 3"):
        sdxl_merge_lora.main(["--models", path_a, path_b, "--ratios", "1", "1", "--save_to", out])


# ------------------------------------------------------------------------------------------------ checkpoints

# modules that get a known delta: TE1/TE2 Linear, UNet attention and feed-forward Linear, conv 3x3, conv 1x1
KNOWN_MODULES = ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_1_mlp_fc1",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_unet_input_blocks_4_0_skip_connection")
KNOWN_RATIO = 0.8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(workdir, original checkpoint, known rank-2 LoRA, tuned checkpoint = original + ratio * LoRA, all targets).

    The tuned checkpoint is written by `sdxl_merge_lora.py --sd_model`, tested below."""
    root = tmp_path_factory.mktemp("lora_tools")
    org = str(root / "org.safetensors")
    make_tiny_checkpoint(org)
    targets = extract_lora_from_models.load_targets(org, 4, 4, None)
    shapes = {name: tuple(layer.weight.shape) for name, layer in targets.items()}
    known = write(root / "known.safetensors", random_lora(9, rank=2, alpha=1.0,
                                                           shapes={n: shapes[n] for n in KNOWN_MODULES}))
    tuned = str(root / "tuned.safetensors")
    sdxl_merge_lora.main(["--sd_model", org, "--models", known, "--ratios", str(KNOWN_RATIO), "--save_to", tuned])
    return root, org, known, tuned, shapes


def test_merge_into_checkpoint_equals_live_merge(checkpoints):
    _, org, known, tuned, _ = checkpoints
    te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(org)
    merger, weights_sd = lora.create_network_from_weights(KNOWN_RATIO, known, vae, [te1, te2], unet,
                                                          for_inference=True)
    merger.merge_to(weights_sd)
    live = sdxl_model_util.sdxl_state_dict(te1, te2, unet, vae, logit_scale)
    saved, metadata = sdxl_model_util.read_safetensors(tuned)
    assert set(saved) == set(live)
    for key, value in live.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    sdxl_model_util.load_models_from_sdxl_checkpoint(tuned)  # loads strictly, with the carried-over config
    assert metadata[sdxl_model_util.CONFIG_METADATA_KEY] == lora_io.read_metadata(org)[
        sdxl_model_util.CONFIG_METADATA_KEY]
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["modelspec.merged_from"] == "org, known"
    assert metadata["modelspec.title"] == "tuned"


def test_concat_merged_lora_applies_like_both(checkpoints):
    root, org, known, _, shapes = checkpoints
    other = write(root / "other.safetensors", random_lora(10, rank=3, alpha=2.0,
                                                           shapes={n: shapes[n] for n in KNOWN_MODULES}))
    both = str(root / "both.safetensors")
    sdxl_merge_lora.main(["--models", known, other, "--ratios", "1", "1", "--concat", "--save_to", both])

    def applied(paths):
        te1, te2, vae, unet, logit_scale, _ = sdxl_model_util.load_models_from_sdxl_checkpoint(org)
        for path in paths:
            merger, weights_sd = lora.create_network_from_weights(1.0, path, vae, [te1, te2], unet,
                                                                  for_inference=True)
            merger.merge_to(weights_sd)
        return sdxl_model_util.sdxl_state_dict(te1, te2, unet, vae, logit_scale)

    separately, merged, original = applied([known, other]), applied([both]), applied([])
    changed = [key for key in original if not np.array_equal(separately[key], original[key])]
    assert len(changed) == len(KNOWN_MODULES)
    for key, value in separately.items():
        np.testing.assert_allclose(merged[key], value, rtol=0, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def diffs(checkpoints):
    _, org, _, tuned, _ = checkpoints
    return extract_lora_from_models.weight_diffs(org, tuned, 4, 4, None)


@pytest.fixture(scope="module")
def unclipped_extraction(diffs):
    return lora_tools.extract_lora(diffs, 4, 4, clamp_quantile=None, progress=False)


def test_checkpoint_difference_is_the_known_delta(checkpoints, diffs):
    tensors, _ = lora_io.read_lora_file(checkpoints[2])
    for name, diff in diffs.items():
        if name in KNOWN_MODULES:
            assert_close(diff, KNOWN_RATIO * delta(tensors, name), rtol=1e-5)
        else:
            assert not np.any(diff), name


def test_extract_recovers_the_delta(checkpoints, unclipped_extraction):
    known_tensors, _ = lora_io.read_lora_file(checkpoints[2])
    for name in KNOWN_MODULES:
        assert_close(delta(unclipped_extraction, name), KNOWN_RATIO * delta(known_tensors, name), rtol=1e-4)


def test_extract_cli_file_and_metadata(checkpoints, unclipped_extraction):
    root, org, known, tuned, shapes = checkpoints
    out = str(root / "extracted.safetensors")
    extract_lora_from_models.main(["--sdxl", "--model_org", org, "--model_tuned", tuned, "--dim", "4",
                                   "--conv_dim", "4", "--save_to", out, "--save_precision", "fp16",
                                   "--device", "cuda"])
    tensors, metadata = lora_io.read_lora_file(out)
    assert set(tensors) == module_keys(shapes)  # the text encoders differ by more than --min_diff 0.01
    for name, shape in shapes.items():
        assert tensors[f"{name}.lora_down.weight"].dtype == np.float16
        assert float(tensors[f"{name}.alpha"]) == min(4, shape[0], shape[1])
    assert {k: v for k, v in metadata.items() if k.startswith("ss_")} == {
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "4.0"})}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.title"] == "extracted"
    assert_sshs_hashes(out)
    # the factors are the SVD's clipped at +-(the 0.99 quantile of all their values), as upstream
    for name in KNOWN_MODULES:
        down = unclipped_extraction[f"{name}.lora_down.weight"]
        up = unclipped_extraction[f"{name}.lora_up.weight"]
        high = np.quantile(np.concatenate([down.ravel(), up.ravel()]), 0.99)
        for key, factor in ((f"{name}.lora_down.weight", down), (f"{name}.lora_up.weight", up)):
            np.testing.assert_allclose(tensors[key].astype(np.float32), np.clip(factor, -high, high), rtol=1e-2,
                                       atol=1e-3 * high)

    # unchanged text encoders (here: a --min_diff above every change) are left out, as upstream
    extract_lora_from_models.main(["--sdxl", "--model_org", org, "--model_tuned", tuned, "--save_to", out,
                                   "--min_diff", "10"])
    names = {lora_io.split_lora_key(key)[0] for key in lora_io.read_lora_file(out)[0]}
    without_conv = extract_lora_from_models.load_targets(org, 4, None, None)
    assert names == {n for n in without_conv if n.startswith("lora_unet_")}
    assert all(len(shapes[n]) == 2 for n in names)  # no --conv_dim: attention and feed-forward Linear layers only

    # without --sdxl the checkpoints are read as SD 1.x, as upstream: an SDXL file is named
    with pytest.raises(SystemExit, match=f"--model_org {re.escape(org)}: an SDXL checkpoint; pass --sdxl"):
        extract_lora_from_models.main(["--model_org", org, "--model_tuned", tuned, "--save_to", out])
    with pytest.raises(SystemExit, match="--v2 and --sdxl cannot be given together"):
        extract_lora_from_models.main(["--sdxl", "--v2", "--model_org", org, "--model_tuned", tuned, "--save_to", out])


# an SD 1.x text-encoder Linear, a 1x1-conv proj_in, a resnet 3x3 conv and an up-block feed-forward Linear
SD_KNOWN_MODULES = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2")


def test_extract_from_sd1_checkpoints_recovers_the_delta(tmp_path):
    org = str(tmp_path / "org.safetensors")
    make_tiny_checkpoint(org, "tiny_sd1")
    shapes = {name: tuple(layer.weight.shape)
              for name, layer in extract_lora_from_models.load_targets(org, 4, 4, None, sdxl=False).items()}
    known = write(tmp_path / "known.safetensors", random_lora(11, rank=2, alpha=1.0,
                                                              shapes={n: shapes[n] for n in SD_KNOWN_MODULES}))
    # the tuned checkpoint: merge_lora.py merges the known LoRA into the original, as a live merge does
    tuned = str(tmp_path / "tuned.safetensors")
    merge_lora.main(["--sd_model", org, "--models", known, "--ratios", "1", "--save_to", tuned])
    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, org)
    merger, weights_sd = lora.create_network_from_weights(1.0, known, vae, [text_encoder], unet, for_inference=True)
    merger.merge_to(weights_sd)
    saved, saved_metadata = sdxl_model_util.read_safetensors(tuned)
    live = model_util.sd_state_dict(False, text_encoder, unet, vae)
    assert set(saved) == set(live)
    for key, value in live.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    assert saved_metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert saved_metadata["modelspec.merged_from"] == "org, known"
    sdxl = str(tmp_path / "sdxl.safetensors")
    make_tiny_checkpoint(sdxl)
    with pytest.raises(SystemExit, match="an SDXL checkpoint; use networks/sdxl_merge_lora.py"):
        merge_lora.main(["--sd_model", sdxl, "--models", known, "--ratios", "1", "--save_to", tuned])

    diffs = extract_lora_from_models.weight_diffs(org, tuned, 4, 4, None, sdxl=False)
    extracted = lora_tools.extract_lora(diffs, 4, 4, clamp_quantile=None, progress=False)
    known_tensors, _ = lora_io.read_lora_file(known)
    for name in shapes:
        if name in SD_KNOWN_MODULES:
            assert_close(delta(extracted, name), delta(known_tensors, name), rtol=1e-4)
        else:
            assert not np.any(diffs[name]), name

    out = str(tmp_path / "extracted.safetensors")
    extract_lora_from_models.main(["--model_org", org, "--model_tuned", tuned, "--dim", "4", "--conv_dim", "4",
                                   "--save_to", out])
    tensors, metadata = lora_io.read_lora_file(out)
    assert set(tensors) == module_keys(shapes)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_show_metadata(checkpoints, capsys):
    _, org, known, tuned, _ = checkpoints
    show_metadata.main([tuned])
    assert json.loads(capsys.readouterr().out) == lora_io.read_metadata(tuned)
    show_metadata.main(["--model", known])
    assert json.loads(capsys.readouterr().out) == lora_io.read_metadata(known)
