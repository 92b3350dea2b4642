"""Data-parallel training under MindSpore's `msrun` launcher (Kohya users know it as `accelerate launch`).

What msrun does (MindSpore 2.10, `mindspore/parallel/cluster/process_entity/_api.py`, checked by running it):
it starts one *scheduler* process and `--local_worker_num` *worker* processes on each node, all running the
same `python <script> <args>` command (`python` from PATH), with these environment variables:
    every process:  MS_ROLE, MS_WORKER_NUM (total workers), MS_SCHED_HOST, MS_SCHED_PORT, MS_TOPO_TIMEOUT,
                    RANK_SIZE (= MS_WORKER_NUM)
    scheduler:      MS_ROLE=MS_SCHED, RANK_ID=0
    workers:        MS_ROLE=MS_WORKER, DEVICE_ID=<local index>; MS_NODE_ID and RANK_ID=<global rank> only when
                    the rank is known at launch (one node, or --node_rank given); otherwise the rank is
                    assigned by `init()`.
Detection: MS_ROLE is MS_WORKER or MS_SCHED. That is the variable MindSpore's own `init()` keys on (dynamic
cluster), so detection and MindSpore agree. Rank and world size are read from the communication group after
`init()`, never from RANK_ID (absent on multi-node launches without --node_rank).

The scheduler process runs our script too: its `init()` serves the cluster and exits the process when the
workers are done, so `init_distributed()` must run before any real work (the trainer calls it first).

Without msrun everything here is a no-op: rank 0 of a world of 1.
"""

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

MSRUN_ROLES = ("MS_WORKER", "MS_SCHED")


@dataclass(frozen=True)
class DistributedState:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


_state = None


def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") in MSRUN_ROLES


def init_distributed() -> DistributedState:
    """Initialise the process group once (under msrun) and set data parallelism with mean-reduced gradients.

    Must run before the train step is built: mindone's GradAccumulator reads the parallel mode when it is
    constructed and all-reduces gradients only in DATA_PARALLEL mode. Ranks other than 0 log warnings only."""
    global _state
    if _state is not None:
        return _state
    if not launched_by_msrun():
        _state = DistributedState()
        return _state

    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()  # the scheduler process never returns from here
    _state = DistributedState(rank=get_rank(), world_size=get_group_size())
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=_state.world_size
    )
    if not _state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info("data-parallel training: rank %d of %d", _state.rank, _state.world_size)
    return _state


def get_state() -> DistributedState:
    """The state set by `init_distributed()`, or a single process if it was not called."""
    return _state or DistributedState()


def barrier():
    """Wait for every rank (a one-element all-reduce). No-op in a single process."""
    if not get_state().is_distributed:
        return
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def gather_json(value, max_bytes: int = 4096) -> list:
    """Every rank's JSON-serialisable `value`, in rank order, on every rank (collective: all ranks call it)."""
    state = get_state()
    if not state.is_distributed:
        return [value]
    import mindspore as ms
    from mindspore import ops

    payload = json.dumps(value).encode("utf-8")
    if len(payload) > max_bytes:
        raise ValueError(f"gather_json: {len(payload)} bytes, more than {max_bytes}")
    buffer = np.zeros(max_bytes + 1, np.int32)
    buffer[0] = len(payload)
    buffer[1 : 1 + len(payload)] = np.frombuffer(payload, np.uint8)
    rows = ops.AllGather()(ms.Tensor(buffer)).asnumpy().reshape(state.world_size, -1)
    return [json.loads(bytes(row[1 : 1 + row[0]].astype(np.uint8)).decode("utf-8")) for row in rows]


def batches_per_rank(num_batches: int, world_size: int) -> int:
    """Batches each rank runs per epoch: the epoch's uneven remainder (num_batches % world_size) is dropped,
    because a rank with one more step than the others would wait forever in the gradient all-reduce."""
    if num_batches < world_size:
        raise ValueError(
            f"{world_size} data-parallel processes but only {num_batches} batches per epoch: every process needs "
            "at least one batch (use fewer processes, a smaller --train_batch_size or more images/repeats)"
        )
    return num_batches // world_size


def rank_batch_indices(num_batches: int, world_size: int, rank: int) -> range:
    """This rank's batch indices in an epoch: rank, rank + N, rank + 2N, ... (upstream's sharding, minus the
    dropped remainder)."""
    return range(rank, batches_per_rank(num_batches, world_size) * world_size, world_size)
