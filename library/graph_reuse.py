"""Graph reuse of repeated blocks: graph mode parses one block of each structure and reuses it at every copy.

`ReusedCell` is the base of the blocks a model repeats; `GraphEntry` the base of cells compiled as top-level graphs
(the models, the train step), which start a reuse generation when they compile. `structure_key` describes what
decides a cell's traced graph; the compile cache (library/graph_compile.py) keys its folders with it too.
`eval_mode` switches models to eval mode and back without leaving a flag changed (flags are part of those keys).
"""

import contextlib
import hashlib
import inspect
from typing import Iterable, Iterator

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops


class ReusedCell(nn.Cell):
    """Base of a block that a model repeats (transformer blocks, resnets, CLIP layers): graph mode parses its
    `construct` once for all instances of the same structure and inlines the result at each call site.

    MindSpore's `lazy_inline(policy="front")` does this, keyed by the cell's `__init__` arguments. That key misses
    what happens after construction (a LoRA module replacing a layer deep inside, block dims giving one block no
    LoRA, `recompute()`), and a wrong key would silently run one block's graph for another. So the key here is the
    structure itself: every sub-cell's path, class, flags and plain attributes, and every parameter's path, shape,
    dtype and trainability. Measured on the SDXL layout (MindSpore 2.10 CPU): the train step compiles 1.4x (tiny)
    to 2.6x (full size) faster, and a static-shape step runs faster too (bench/README.md).
    """

    # read by MindSpore's graph compiler: inline the shared graph at the front end (the CPU backend cannot run
    # cell graphs that stay separate); the attribute lazy_inline(policy="front") sets
    no_inline = False
    # attributes that differ between instances without changing the computation (e.g. a LoRA module's name)
    graph_neutral_attributes = ()
    # False: this instance is parsed on its own, as any cell (for a layout where MindSpore shares wrongly)
    shares_graph = True

    @property
    def cell_init_args(self):
        if not _share_repeated_blocks or not self.shares_graph:
            raise AttributeError("cell_init_args")  # MindSpore then parses the cell as any other
        return f"lazy_inline_{type(self).__name__}_{_graph_generation}_{structure_key(self)}"

    @cell_init_args.setter
    def cell_init_args(self, value):
        raise AttributeError("a ReusedCell's graph key is derived from its structure; it cannot be set")


# Part of every reuse key, renewed before each top-level compile (`new_graph_generation`): MindSpore keeps parsed
# cell graphs by key across compiles, and a graph reused from an earlier compile keeps that compile's input shapes
# (measured, MindSpore 2.10: a Reshape fails, or worse would not), so reuse stays within one compile.
_graph_generation = 0
# Off for a graph with control flow around the blocks (mindone's gradient-accumulation branch): shared block graphs
# there were wired to the wrong inputs (measured, MindSpore 2.10), so each block is parsed on its own
_share_repeated_blocks = True


def new_graph_generation(share_repeated_blocks: bool = True):
    """Call before a top-level graph compiles (a train step, a jitted function, a model called in graph mode)."""
    global _graph_generation, _share_repeated_blocks
    _graph_generation += 1
    _share_repeated_blocks = share_repeated_blocks


def mark_resolution(cell: nn.Cell, downsampling: int):
    """Record on every reused block inside `cell` the downsampling factor of the feature maps it sees, which makes
    it part of their reuse key: blocks of one structure at two resolutions (a UNet whose levels share a width, the
    VAE's 512-wide levels) then get a graph each. One graph shared across input shapes in a static-shape compile
    was specialised to the first shape at random (measured, MindSpore 2.10: a Reshape failed in 1 run of 3)."""
    for _, sub in cell.cells_and_names():
        if isinstance(sub, ReusedCell):
            sub.feature_downsampling = downsampling


class GraphEntry(nn.Cell):
    """Base of a model that may be called as a top-level graph: starts a reuse generation when it compiles."""

    shares_repeated_blocks = True

    def compile(self, *args, **kwargs):
        new_graph_generation(self.shares_repeated_blocks)
        return super().compile(*args, **kwargs)


@contextlib.contextmanager
def eval_mode(cells: Iterable[nn.Cell]) -> Iterator[None]:
    """Every cell (and sub-cell) in eval mode inside; after, each cell's `training`, phase and graph flags exactly
    as before (the flags are part of the repeated blocks' reuse keys, `structure_key`)."""
    cells = list(cells)
    saved = []
    for root in cells:
        for _, cell in root.cells_and_names():
            saved.append((cell, cell.training, cell.phase, dict(cell.get_flags())))
    try:
        for root in cells:
            root.set_train(False)
        yield
    finally:
        for cell, training, phase, flags in saved:
            cell.training = training
            cell.phase = phase
            live_flags = cell.get_flags()  # the cell's own dict
            live_flags.clear()
            live_flags.update(flags)


# attributes MindSpore sets on a cell when it compiles it: bookkeeping, not structure
_COMPILE_BOOKKEEPING = frozenset({"arguments_key", "current_phase", "compile_phase"})


def structure_key(cell: nn.Cell) -> str:
    """Everything about `cell` and its sub-cells that decides the graph its `construct` traces to."""
    parts = []
    for path, sub in cell.cells_and_names():
        ignored = _COMPILE_BOOKKEEPING.union(getattr(sub, "graph_neutral_attributes", ()))
        attributes = sorted((k, _describe(v)) for k, v in vars(sub).items()
                            if not k.startswith("_") and k not in ignored and _describe(v) is not None)
        parts.append((path, type(sub).__qualname__, sorted(sub.get_flags().items()), attributes))
    for path, param in cell.parameters_and_names():
        parts.append((path, tuple(param.shape), str(param.dtype), param.requires_grad))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _describe(value, depth: int = 0):
    """A stable description of an attribute that can change a traced graph: plain values, primitives, functions,
    constant tensors and (two levels deep) plain helper objects such as the loss settings. None for sub-cells and
    parameters (described on their own) and anything else."""
    if isinstance(value, Parameter):
        return None
    if isinstance(value, (bool, int, float, str, type(None))):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_describe(v, depth) for v in value]
        return None if None in items else "(" + ",".join(items) + ")"
    if isinstance(value, ops.Primitive):
        return f"{value.name}{sorted(value.attrs.items())}"
    if inspect.isfunction(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, ms.Tensor):
        data = value.asnumpy()
        return f"tensor{data.dtype}{data.shape}:{hashlib.sha256(data.tobytes()).hexdigest()}"
    if isinstance(value, np.ndarray):
        return f"array{value.dtype}{value.shape}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    if depth < 2 and not isinstance(value, (nn.Cell, type)) and hasattr(value, "__dict__") and not callable(value):
        fields = sorted((k, _describe(v, depth + 1)) for k, v in vars(value).items())
        return f"{type(value).__qualname__}{[f for f in fields if f[1] is not None]}"
    return None
