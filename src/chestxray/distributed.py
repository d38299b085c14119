"""Several processes, one result: the trainer's process layout under ``torchrun``, validation outputs
gathered from every rank, and batch prediction sharded across ranks.

``torchrun`` starts one process per device on every node and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; see ``docs/distributed.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy

from .config import TrainConfig
from .errors import ChestXrayError
from .predict import DEFAULT_BATCH, expand_inputs, load_model, predict_paths

T = TypeVar("T")


def world_size() -> int:
    """Number of processes of this launch (``$WORLD_SIZE``; 1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_layout() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` when this process was started by ``torchrun``, else ``None``."""
    if not TorchElasticEnvironment.detect():
        return None
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, world_size() // per_node


def trainer_layout(config: TrainConfig, accelerator: str) -> dict[str, Any]:
    """Lightning's ``devices``, ``num_nodes`` and ``strategy`` for ``config``.

    Under ``torchrun`` the launcher's layout is used (``--devices`` and ``--num-nodes`` may be left
    out; values that contradict it are an error). Several processes mean DDP; DDP then looks for
    unused parameters when the first epochs train the head only, since frozen weights get no gradient.
    """
    devices: int | str = int(config.devices) if str(config.devices).isdigit() else config.devices
    num_nodes = config.num_nodes
    launched = torchrun_layout()
    if launched is not None:
        per_node, nodes = launched
        if devices not in ("auto", per_node) or num_nodes not in (1, nodes):
            raise ChestXrayError(f"--devices {config.devices} --num-nodes {num_nodes} contradict torchrun's "
                                 f"{per_node} process(es) per node on {nodes} node(s); leave them out under torchrun")
        devices, num_nodes = per_node, nodes
    per_node_count = devices if isinstance(devices, int) else (
        torch.cuda.device_count() if accelerator == "gpu" and devices == "auto" else 1)
    strategy: str | DDPStrategy = config.strategy
    if config.strategy == "ddp" or (config.strategy == "auto" and per_node_count * num_nodes > 1):
        strategy = DDPStrategy(find_unused_parameters=config.freeze_epochs > 0)
    return {"devices": devices, "num_nodes": num_nodes, "strategy": strategy}


def gather_in_order(rows: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``rows`` of an unshuffled ``DistributedSampler`` pass, on every rank, in dataset
    order and without the sampler's padding (its repeated first rows): ``(total, ...)``.

    Rank ``r`` saw the rows ``r, r + world, r + 2 * world, ...`` of the padded index list.
    """
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)[:total]


def shard(items: Sequence[T], rank: int, world: int, block: int = 1) -> Sequence[T]:
    """Rank ``rank``'s contiguous share of ``items`` in whole blocks of ``block`` items, as even as can be.

    The shards of ranks ``0 .. world - 1``, concatenated, are ``items``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    blocks = -(-len(items) // block)
    return items[blocks * rank // world * block: blocks * (rank + 1) // world * block]


def sharded_predict(model: str | Path, inputs: Sequence[str | Path], *, backend: str = "torch",
                    batch_size: int = DEFAULT_BATCH, progress: bool = True, tta: bool = False) -> pd.DataFrame | None:
    """:func:`predict.predict_paths` over files, folders and globs, with every rank of a ``torchrun`` launch.

    Rank 0 expands the inputs once and sends the list to every rank; each rank predicts a contiguous
    shard of whole batches, so every image is predicted in the same batch as in one process (on CPUs
    the figures equal those of one process with as many threads as each rank); rank 0 gathers the
    rows in input order. Returns the table on rank 0 and ``None`` on the others; outside a
    distributed launch it runs in this process. Each rank uses the GPU of its local rank if any.
    """
    cuda = backend == "torch" and torch.cuda.is_available()
    predictor = load_model(model, backend, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else None)
    if world_size() == 1:
        return predict_paths(predictor, inputs, batch_size, progress, tta=tta)
    if not dist.is_initialized():  # kept for the life of the process: a group made again after
        dist.init_process_group("gloo")  # destroy_process_group can hang on torchrun's store
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")  # only Python objects travel
    rank, world = dist.get_rank(), dist.get_world_size()
    entries = [expand_inputs(inputs) if rank == 0 else None]
    dist.broadcast_object_list(entries, src=0, group=group)
    files = [file for file, _ in shard(entries[0], rank, world, block=batch_size)]
    frame = predict_paths(predictor, files, batch_size, progress and rank == 0, tta=tta)
    frames: list[pd.DataFrame | None] | None = [None] * world if rank == 0 else None
    dist.gather_object(frame, frames, dst=0, group=group)
    if frames is None:
        return None
    parts = [part for part in frames if len(part)]
    return pd.concat(parts, ignore_index=True) if parts else frame
