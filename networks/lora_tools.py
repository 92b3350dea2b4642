"""The numeric core of Kohya's LoRA tools (resize_lora, svd_merge_lora, sdxl_merge_lora, extract_lora_from_models).

Everything works on numpy arrays under Kohya's keys (`<name>.lora_down.weight`, `<name>.lora_up.weight`,
`<name>.alpha`). A module's update of its layer is `alpha / dim * up @ down`; the SVD code sees it as a matrix
[out, in * kh * kw] and returns factors in Kohya's layouts (Linear: down [r, in], up [out, r]; Conv2d: down
[r, in, kh, kw], up [out, r, 1, 1]). Factors split as upstream's do: up = U * S, down = Vh.

Where these functions differ from upstream on purpose (README, "LoRA tools"):
- the SVD of a LoRA (`resize_lora`, `svd_merge_loras`) is taken from QR decompositions of its factors instead of the
  full [out, in] product: the same singular values and vectors, far cheaper for SDXL's 1280 x 10240 layers;
- `resize_lora` gives the conv rank to 3x3 convs only (upstream also to 1x1 convs, which training gives the linear
  rank), as svd_merge and extract do upstream;
- `merge_loras(concat=True)` rescales each LoRA for the concatenated rank, so the result equals applying the inputs;
  upstream kept the first file's alpha over the summed rank, which weakened every input by dim / summed dim.
"""

import json
import logging
import math
import os
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
from tqdm import tqdm

from networks import lora_io

logger = logging.getLogger(__name__)

MIN_SV = 1e-6  # upstream treats a module whose largest singular value is at most this as a zero matrix
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
PRECISIONS = {"float": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}
NETWORK_MODULE = "networks.lora"
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"


class LoraModule(NamedTuple):
    down: np.ndarray  # float32, Kohya's layout
    up: np.ndarray
    alpha: float

    @property
    def dim(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    @property
    def weight_shape(self) -> tuple:
        """Shape of the layer weight this module updates."""
        return (self.up.shape[0],) + tuple(self.down.shape[1:])


class Svd(NamedTuple):
    u: np.ndarray  # [out, k]
    s: np.ndarray  # [k], descending
    vh: np.ndarray  # [k, in * kh * kw]


class ResizeInfo(NamedTuple):
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float  # share of sum(S) kept
    fro_retained: float  # share of the Frobenius norm kept
    max_ratio: float  # S[0] / S[new_rank - 1]


# ------------------------------------------------------------------------------------------------ modules

def lora_modules(tensors: Dict[str, np.ndarray], source: str) -> Dict[str, LoraModule]:
    """The LoRA modules of a file's tensors as float32 (dim and alpha as `lora_io.modules_dims_and_alphas`)."""
    dims, alphas = lora_io.modules_dims_and_alphas(tensors)
    if not dims:
        raise ValueError(f"{source}: no '<name>.lora_down.weight' keys; it looks like "
                         f"{lora_io.describe_lora_names(tensors)}")
    modules = {}
    for name in dims:
        down = tensors[f"{name}.{lora_io.LORA_DOWN}"]
        up = tensors.get(f"{name}.{lora_io.LORA_UP}")
        if up is None:
            raise ValueError(f"{source}: module {name} has a lora_down.weight but no lora_up.weight")
        if up.ndim != down.ndim or up.shape[1] != down.shape[0]:
            raise ValueError(f"{source}: module {name}: lora_up {tuple(up.shape)} does not fit lora_down "
                             f"{tuple(down.shape)}")
        modules[name] = LoraModule(np.asarray(down, np.float32), np.asarray(up, np.float32), alphas[name])
    return modules


def module_tensors(name: str, down: np.ndarray, up: np.ndarray, alpha: float) -> Dict[str, np.ndarray]:
    """Kohya's three tensors of one module (alpha as a 0-d float32, as training writes it)."""
    return {f"{name}.{lora_io.LORA_DOWN}": down, f"{name}.{lora_io.LORA_UP}": up,
            f"{name}.{lora_io.ALPHA}": np.asarray(alpha, dtype=np.float32)}


def module_delta(module: LoraModule) -> np.ndarray:
    """`scale * up @ down` in the layer weight's layout."""
    delta = module.scale * _matrix(module.up) @ _matrix(module.down)
    return delta.reshape(module.weight_shape)


def _matrix(factor: np.ndarray) -> np.ndarray:
    return factor.reshape(factor.shape[0], -1)


def target_rank(weight_shape: tuple, rank: int, conv_rank: Optional[int]) -> int:
    """`conv_rank` for 3x3 convs (when given), `rank` otherwise; never above the layer's in or out channels (a LoRA
    rank cannot exceed them, as upstream caps it)."""
    is_conv3x3 = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
    chosen = conv_rank if is_conv3x3 and conv_rank is not None else rank
    return min(chosen, weight_shape[0], weight_shape[1])


# ------------------------------------------------------------------------------------------------ SVD

def lowrank_svd(up2d: np.ndarray, down2d: np.ndarray) -> Svd:
    """SVD of `up2d @ down2d` (rank <= r) without forming it: with up = Qu Ru and down^T = Qd Rd, the product is
    Qu (Ru Rd^T) Qd^T, so only the small r x r core needs an SVD. Exact up to rounding (computed in float64)."""
    qu, ru = np.linalg.qr(up2d.astype(np.float64))
    qd, rd = np.linalg.qr(down2d.T.astype(np.float64))
    u, s, vh = np.linalg.svd(ru @ rd.T)
    return Svd(qu @ u, s, vh @ qd.T)


def full_svd(matrix: np.ndarray) -> Svd:
    """SVD of an arbitrary [out, in] matrix (weight differences), in float32 as upstream."""
    u, s, vh = np.linalg.svd(matrix.astype(np.float32), full_matrices=False)
    return Svd(u, s, vh)


def select_rank(s: np.ndarray, max_rank: int, dynamic_method: Optional[str] = None,
                dynamic_param: Optional[float] = None) -> int:
    """Upstream's rank choice (resize_lora.rank_resize) from a module's full spectrum `s` (descending, zeros kept).

    Without a method: `max_rank`. sv_ratio: the singular values above s[0] / param; sv_cumulative: the first index
    where cumsum(s) / sum(s) reaches param, plus one; sv_fro: the same on s^2 against param^2. Upstream clamps that
    count to [1, len(s) - 1] and then adds one rank more, for every method; kept so ranks match upstream's files.
    The result is capped at `max_rank`; a zero matrix gets rank 1.
    """
    if s[0] <= MIN_SV:
        return 1
    if dynamic_method is None:
        return max_rank
    if dynamic_method == "sv_ratio":
        count = int(np.sum(s > s[0] / dynamic_param))
    elif dynamic_method == "sv_cumulative":
        count = int(np.searchsorted(np.cumsum(s) / np.sum(s), dynamic_param)) + 1
    elif dynamic_method == "sv_fro":
        squares = s ** 2
        count = int(np.searchsorted(np.cumsum(squares) / np.sum(squares), dynamic_param ** 2)) + 1
    else:
        raise ValueError(f"unknown dynamic method '{dynamic_method}' (known: {', '.join(DYNAMIC_METHODS)})")
    return min(max(1, min(count, len(s) - 1)) + 1, max_rank)


def retained(s: np.ndarray, rank: int) -> Tuple[float, float, float]:
    """(sum(S) share, Frobenius-norm share, S[0] / S[rank - 1]) kept by a rank-`rank` truncation (nan for a zero
    matrix, as upstream)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sum_retained = float(np.sum(s[:rank]) / np.sum(s))
        fro_retained = float(np.sqrt(np.sum(s[:rank] ** 2) / np.sum(s ** 2)))
        max_ratio = float(s[0] / s[rank - 1])
    return sum_retained, fro_retained, max_ratio


def factors(svd: Svd, rank: int, weight_shape: tuple) -> Tuple[np.ndarray, np.ndarray]:
    """(down, up) of rank `rank` in Kohya's layouts: up = U S, down = Vh. A rank above the spectrum's length gets
    zero components, so the file still has the requested rank (upstream's full SVD pads with zero singular values)."""
    kept = min(rank, len(svd.s))
    up = np.zeros((weight_shape[0], rank), np.float32)
    up[:, :kept] = svd.u[:, :kept] * svd.s[:kept]
    down = np.zeros((rank, svd.vh.shape[1]), np.float32)
    down[:kept] = svd.vh[:kept]
    if len(weight_shape) == 4:
        up = up.reshape(weight_shape[0], rank, 1, 1)
    return down.reshape((rank,) + tuple(weight_shape[1:])), up


def clamp_to_quantile(down: np.ndarray, up: np.ndarray, quantile: float) -> Tuple[np.ndarray, np.ndarray]:
    """Clip both factors to +-(the `quantile` quantile of all their values), as upstream does after an SVD of a full
    difference: a few outlying values would otherwise dominate the factors' range in fp16."""
    high = np.quantile(np.concatenate([up.ravel(), down.ravel()]), quantile)
    return np.clip(down, -high, high), np.clip(up, -high, high)


def concat_ranks(parts: Sequence[Tuple[float, LoraModule]], scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """(down, up) with the modules' ranks side by side, such that `scale * up @ down = sum(weight * delta)`.

    Each module's factors take sqrt(|weight| * its scale / scale), the sign going to down (upstream's split, which
    keeps the two factors of similar size).
    """
    downs, ups = [], []
    for weight, module in parts:
        factor = math.sqrt(abs(weight) * module.scale / scale)
        downs.append(module.down * (math.copysign(factor, weight)))
        ups.append(module.up * factor)
    return np.concatenate(downs, axis=0), np.concatenate(ups, axis=1)


# ------------------------------------------------------------------------------------------------ the tools

def resize_lora(tensors: Dict[str, np.ndarray], new_rank: int, new_conv_rank: Optional[int] = None,
                dynamic_method: Optional[str] = None, dynamic_param: Optional[float] = None, source: str = "LoRA",
                progress: bool = True) -> Tuple[Dict[str, np.ndarray], List[ResizeInfo]]:
    """Every module re-factored by SVD to `new_rank` (3x3 convs: `new_conv_rank`), or to the rank a dynamic method
    picks with that as its cap. Alpha becomes old scale * new rank, so each module's update is the best rank-r
    approximation of the old one. Keys that belong to no module pass through. Returns (tensors, per-module infos)."""
    if dynamic_method is not None and dynamic_method not in DYNAMIC_METHODS:
        raise ValueError(f"unknown dynamic method '{dynamic_method}' (known: {', '.join(DYNAMIC_METHODS)})")
    modules = lora_modules(tensors, source)
    resized = {key: value for key, value in tensors.items() if lora_io.split_lora_key(key)[0] not in modules}
    infos = []
    for name, module in tqdm(modules.items(), desc="resizing", unit="module", disable=not progress):
        svd = lowrank_svd(_matrix(module.up), _matrix(module.down))
        out_dim, in_dim = module.up.shape[0], svd.vh.shape[1]
        spectrum = np.pad(svd.s, (0, min(out_dim, in_dim) - len(svd.s)))  # the zeros of upstream's full SVD
        rank = select_rank(spectrum, target_rank(module.weight_shape, new_rank, new_conv_rank), dynamic_method,
                           dynamic_param)
        down, up = factors(svd, rank, module.weight_shape)
        new_alpha = module.scale * rank
        resized.update(module_tensors(name, down, up, new_alpha))
        infos.append(ResizeInfo(name, module.dim, rank, new_alpha, *retained(spectrum, rank)))
    return resized, infos


class _Part(NamedTuple):
    ratio: float
    module: LoraModule
    source: str


def _group_modules(loras: Sequence[Tuple[str, Dict[str, np.ndarray], float]]) -> Dict[str, List[_Part]]:
    """module name -> its parts from every (source, tensors, ratio) in order; a module must update the same layer
    shape in every file. Diffusers-named UNet keys are renamed to SGM names first, so both spellings combine."""
    grouped: Dict[str, List[_Part]] = {}
    for source, tensors, ratio in loras:
        tensors, _ = lora_io.convert_diffusers_to_sgm(tensors)
        for name, module in lora_modules(tensors, source).items():
            parts = grouped.setdefault(name, [])
            if parts and parts[0].module.weight_shape != module.weight_shape:
                raise ValueError(f"{source}: module {name} updates a layer of shape {module.weight_shape}, but "
                                 f"{parts[0].source} one of shape {parts[0].module.weight_shape}")
            parts.append(_Part(ratio, module, source))
    return grouped


def svd_merge_loras(loras: Sequence[Tuple[str, Dict[str, np.ndarray], float]], new_rank: int,
                    new_conv_rank: Optional[int] = None, clamp_quantile: Optional[float] = 0.99,
                    progress: bool = True) -> Dict[str, np.ndarray]:
    """One LoRA whose modules are the rank-`new_rank` SVD (3x3 convs: `new_conv_rank`) of sum(ratio * delta) over
    the (source, tensors, ratio) inputs, alpha = rank (scale 1), factors clipped at `clamp_quantile` as upstream
    (None: not clipped). The sum is low-rank, so its SVD comes from the concatenated ranks."""
    merged = {}
    for name, parts in tqdm(_group_modules(loras).items(), desc="svd merging", unit="module", disable=not progress):
        down, up = concat_ranks([(part.ratio, part.module) for part in parts], scale=1.0)
        shape = parts[0].module.weight_shape
        rank = target_rank(shape, new_rank, new_conv_rank)
        down, up = factors(lowrank_svd(_matrix(up), _matrix(down)), rank, shape)
        if clamp_quantile is not None:
            down, up = clamp_to_quantile(down, up, clamp_quantile)
        merged.update(module_tensors(name, down, up, rank))
    return merged


def merge_loras(loras: Sequence[Tuple[str, Dict[str, np.ndarray], float]], concat: bool = False,
                shuffle: bool = False, rng: Optional[np.random.Generator] = None,
                progress: bool = True) -> Dict[str, np.ndarray]:
    """sdxl_merge_lora's LoRA-into-LoRA merge. A module keeps the alpha of the first file that has it, and each
    ratio multiplies both factors (upstream's convention: a LoRA enters with ratio * |ratio|).

    Default: factors are summed (up: sqrt(alpha_i / alpha) * |ratio_i| * up_i, down: the same with ratio_i's sign),
    which needs equal ranks and is exact only for one input (the cross terms up_i @ down_j remain). `concat`: the
    ranks are concatenated, exactly sum(ratio_i * |ratio_i| * delta_i), at the summed rank. `shuffle` permutes the
    rank order (the update is unchanged; it hides which rows came from which input).
    """
    rng = rng if rng is not None else np.random.default_rng()
    merged = {}
    for name, parts in tqdm(_group_modules(loras).items(), desc="merging", unit="module", disable=not progress):
        alpha = parts[0].module.alpha
        if concat:
            dim = sum(part.module.dim for part in parts)
            down, up = concat_ranks([(part.ratio * abs(part.ratio), part.module) for part in parts], alpha / dim)
        else:
            for part in parts[1:]:
                if part.module.dim != parts[0].module.dim:
                    raise ValueError(f"{part.source}: module {name} has rank {part.module.dim}, {parts[0].source} "
                                     f"rank {parts[0].module.dim}; merge different ranks with --concat or "
                                     "svd_merge_lora.py")
            down = up = 0.0
            for part in parts:
                factor = math.sqrt(part.module.alpha / alpha) * part.ratio
                down = down + part.module.down * factor
                up = up + part.module.up * abs(factor)
        if shuffle:
            order = rng.permutation(down.shape[0])
            down, up = down[order], up[:, order]
        merged.update(module_tensors(name, down.astype(np.float32), up.astype(np.float32), alpha))
    return merged


def extract_lora(diffs: Dict[str, np.ndarray], dim: int, conv_dim: Optional[int] = None,
                 clamp_quantile: Optional[float] = 0.99, progress: bool = True) -> Dict[str, np.ndarray]:
    """A LoRA approximating each weight difference (`{lora name: tuned - original}` in the layer's layout) by its
    rank-`dim` SVD (3x3 convs: `conv_dim`), alpha = rank (scale 1), clipped at `clamp_quantile` (None: not)."""
    lora = {}
    for name, diff in tqdm(diffs.items(), desc="extracting", unit="module", disable=not progress):
        rank = target_rank(diff.shape, dim, conv_dim)
        down, up = factors(full_svd(diff.reshape(diff.shape[0], -1)), rank, diff.shape)
        if clamp_quantile is not None:
            down, up = clamp_to_quantile(down, up, clamp_quantile)
        lora.update(module_tensors(name, down, up, rank))
    return lora


# ------------------------------------------------------------------------------------------------ files

def check_save_to(save_to: Optional[str]):
    if not save_to or not save_to.lower().endswith(".safetensors"):
        raise ValueError(f"--save_to must name a .safetensors file, got {save_to!r} (torch formats need torch)")


def check_merge_inputs(models: Optional[Sequence[str]], ratios: Optional[Sequence[float]], save_to: Optional[str]):
    """The merge scripts' argument checks, before anything is read."""
    if not models:
        raise ValueError("--models: at least one LoRA file is required")
    if not ratios or len(ratios) != len(models):
        raise ValueError(f"--ratios needs one value per model: {len(models)} models, {len(ratios or [])} ratios")
    check_save_to(save_to)


def read_loras(models: Sequence[str], ratios: Sequence[float]):
    """([(path, tensors, ratio)], [metadata]) of the LoRA files to merge."""
    loras, metadatas = [], []
    for path, ratio in zip(models, ratios):
        logger.info(f"loading {path}")
        tensors, metadata = lora_io.read_lora_file(path)
        loras.append((path, tensors, ratio))
        metadatas.append(metadata)
    return loras, metadatas


def cast_tensors(tensors: Dict[str, np.ndarray], dtype) -> Dict[str, np.ndarray]:
    """Floating tensors (alphas included, as upstream) cast to `dtype`; others unchanged."""
    return {key: value.astype(dtype) if np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
            else value for key, value in tensors.items()}


def minimum_network_metadata(v2: Optional[str], base_model: Optional[str], dim: str, alpha: str,
                             network_args: Optional[dict] = None) -> Dict[str, str]:
    """Upstream's `build_minimum_network_metadata`: what a merged LoRA carries besides modelspec and hashes."""
    metadata = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": dim, "ss_network_alpha": alpha}
    if v2 is not None:
        metadata["ss_v2"] = v2
    if base_model is not None:
        metadata["ss_base_model_version"] = base_model
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def base_model_of(metadatas: Iterable[Dict[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(ss_v2, ss_base_model_version), each from the first input that has it, as upstream's merges take them."""
    v2 = base_model = None
    for metadata in metadatas:
        v2 = v2 if v2 is not None else metadata.get("ss_v2")
        base_model = base_model if base_model is not None else metadata.get("ss_base_model_version")
    return v2, base_model


def merged_from(paths: Sequence[str]) -> str:
    """`modelspec.merged_from`: each input's modelspec.title, or its file name without extension."""
    titles = []
    for path in paths:
        title = lora_io.read_metadata(path).get("modelspec.title")
        titles.append(title if title is not None else os.path.splitext(os.path.basename(path))[0])
    return ", ".join(titles)


def summarize_dims(tensors: Dict[str, np.ndarray]) -> Tuple[str, str]:
    """(ss_network_dim, ss_network_alpha) of a merged LoRA: the common value, or "Dynamic" when modules differ."""
    dims, alphas = lora_io.modules_dims_and_alphas(tensors)
    dim_values, alpha_values = set(dims.values()), set(alphas.values())
    return (str(dim_values.pop()) if len(dim_values) == 1 else "Dynamic",
            str(alpha_values.pop()) if len(alpha_values) == 1 else "Dynamic")
