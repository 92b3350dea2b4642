"""Compiling a graph-mode step: one graph for every bucket, a compile cache that cannot mix graphs up.

`CompiledStep` wraps the training step cell and is called like it. It
- declares dynamic input shapes before the first call (the batch axis of per-sample inputs, the height and
  width of images, latents and noise), so one compiled graph serves every bucket and the smaller last batch;
  with `static_shapes=True` each new shape compiles a graph of its own, as MindSpore does by default;
- tells the user when a call compiles and how long it took;
- uses MindSpore's compile cache for the first compile only, in a folder named after everything that decides
  the graph. MindSpore identifies cached graphs by the order in which a process compiles them
  (`compile_cache_<n>.mindir`) and checks only the hash of the Python sources: a warm cache whose run compiled
  other shapes, or other graphs, first loads a graph traced for different inputs, which trained NaN. Here the
  cached process compiles exactly one graph, in a folder that no other graph can share.
"""

import hashlib
import json
import logging
import os
import time
from typing import Optional, Sequence

import mindspore as ms

from library.graph_reuse import structure_key

logger = logging.getLogger(__name__)

COMPILE_RECORD = "compile_record.json"  # what the cold compile took, beside MindSpore's files

# MindSpore keeps the first compile cache folder a process sets and ignores later ones, so one process can use
# one cache folder only (a second graph cached there would take index 1: the mix-up described above)
_process_cache_dir = None


def dynamic_input_specs(inputs: Sequence[ms.Tensor], per_sample: Sequence[bool]):
    """Placeholders for `Cell.set_inputs`: dynamic batch axis where `per_sample`, dynamic H and W of 4-D inputs."""
    specs = []
    for tensor, batched in zip(inputs, per_sample):
        shape = list(tensor.shape)
        if batched and shape:
            shape[0] = None
        if len(shape) == 4:
            shape[2:] = [None, None]
        specs.append(ms.Tensor(shape=shape, dtype=tensor.dtype))
    return specs


def graph_cache_key(cell, input_specs) -> str:
    """A digest of what decides `cell`'s compiled graph: its structure (every sub-cell, attribute and parameter),
    the declared inputs and the MindSpore version. The Python sources MindSpore checks itself."""
    inputs = [(str(spec.dtype), tuple(spec.shape)) for spec in input_specs]
    text = repr((ms.__version__, ms.get_context("device_target"), structure_key(cell), inputs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CompiledStep:
    """Calls `cell(*inputs)`, compiling once for all shapes (or once per shape with `static_shapes`)."""

    def __init__(self, cell, per_sample: Sequence[bool], description: str = "the training step",
                 static_shapes: bool = False, compile_cache_dir: Optional[str] = None):
        self.cell = cell
        self.per_sample = tuple(per_sample)
        self.description = description
        self.static_shapes = static_shapes
        self.compile_cache_dir = compile_cache_dir
        self.seen_shapes = set()

    @property
    def num_compiles(self) -> int:
        """Graphs MindSpore compiled (or loaded from the cache) for the cell: its own record of compiled phases."""
        return len(self.cell.compile_cache)

    def __call__(self, *inputs):
        shapes = tuple(tuple(t.shape) for t in inputs)
        if shapes in self.seen_shapes:
            return self.cell(*inputs)
        first_call = not self.seen_shapes
        self.seen_shapes.add(shapes)
        if not first_call and not self.static_shapes:
            return self.cell(*inputs)  # the dynamic-shape graph takes it

        specs = inputs
        if first_call and not self.static_shapes:
            specs = dynamic_input_specs(inputs, self.per_sample)
            self.cell.set_inputs(*specs)
        cache_dir = None
        if first_call and self.compile_cache_dir:
            cache_dir = self._claim_cache_dir(os.path.join(self.compile_cache_dir, graph_cache_key(self.cell, specs)))
        return self._compile_and_run(inputs, cache_dir)

    def _claim_cache_dir(self, cache_dir):
        global _process_cache_dir
        if _process_cache_dir is not None:
            logger.warning("not using the compile cache for %s: this process already cached another graph in %s",
                           self.description, _process_cache_dir)
            return None
        _process_cache_dir = cache_dir
        return cache_dir

    def _compile_and_run(self, inputs, cache_dir):
        record = _read_record(cache_dir)
        if record:
            logger.info("loading %s from the compile cache %s (compiling it took %.0f s)", self.description,
                        cache_dir, record["compile_s"])
        else:
            shapes = "every bucket" if not self.static_shapes else f"batch shape {tuple(inputs[0].shape)}"
            logger.info("compiling %s for %s (graph mode compiles on the first call; minutes for full-size SDXL "
                        "on a CPU)", self.description, shapes)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            ms.set_context(enable_compile_cache=True, compile_cache_path=cache_dir)
        start = time.perf_counter()
        try:
            outputs = self.cell(*inputs)
            outputs[0].asnumpy()  # wait: asynchronous backends return before the step has run
        finally:
            if cache_dir:
                # later graphs (other shapes, other cells) must not join this folder: see the module docstring
                ms.set_context(enable_compile_cache=False)
        seconds = time.perf_counter() - start
        logger.info("%s %s in %.1f s (first step included)", "loaded" if record else "compiled", self.description,
                    seconds)
        if cache_dir and not record:
            _write_record(cache_dir, {"compile_s": seconds})
        return outputs


def _read_record(cache_dir):
    path = cache_dir and os.path.join(cache_dir, COMPILE_RECORD)
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # a damaged record only loses the message; MindSpore validates its own files


def _write_record(cache_dir, record):
    path = os.path.join(cache_dir, COMPILE_RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
