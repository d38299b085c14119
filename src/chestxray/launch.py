"""The process layout of a launch: ``torchrun``'s environment, the trainer's devices/nodes/strategy,
and validation outputs gathered from every rank.

``torchrun`` starts one process per device on every node and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; see ``docs/distributed.md``. Reading the environment
(:func:`world_size`) imports nothing heavy, so the command line can ask it before loading torch.
Sharded prediction is :func:`chestxray.predict.sharded_predict`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import ChestXrayError

if TYPE_CHECKING:
    import torch

    from .training.config import RuntimeSettings

__all__ = ["world_size", "local_rank", "is_first_process", "torchrun_layout", "trainer_layout", "gather_in_order", "one_device",
           "peer_lost"]


def world_size() -> int:
    """Number of processes of this launch (``$WORLD_SIZE``; 1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (``$LOCAL_RANK``; 0 outside a distributed launch)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_first_process() -> bool:
    """Whether this is rank 0 of the launch (or the only process): ``$RANK``, else Lightning's
    ``$NODE_RANK``/``$LOCAL_RANK`` of the processes it starts itself."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and local_rank() == 0


def torchrun_layout() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` when this process was started by ``torchrun``, else ``None``."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if not TorchElasticEnvironment.detect():
        return None
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, world_size() // per_node


def trainer_layout(runtime: RuntimeSettings, accelerator: str, frozen: bool = False) -> dict[str, Any]:
    """Lightning's ``devices``, ``num_nodes`` and ``strategy`` for ``runtime``.

    Under ``torchrun`` the launcher's layout is used (``--devices`` and ``--num-nodes`` may be left
    out; values that contradict it are an error). Several processes mean DDP; DDP then looks for
    unused parameters when some weights are ``frozen`` (a frozen first epoch, frozen stages), since
    frozen weights get no gradient.
    """
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    devices: int | str = int(runtime.devices) if runtime.devices.isdigit() else runtime.devices
    num_nodes = runtime.num_nodes
    launched = torchrun_layout()
    if launched is not None:
        per_node, nodes = launched
        if devices not in ("auto", per_node) or num_nodes not in (1, nodes):
            raise ChestXrayError(f"--devices {runtime.devices} --num-nodes {num_nodes} contradict torchrun's "
                                 f"{per_node} process(es) per node on {nodes} node(s); leave them out under torchrun")
        devices, num_nodes = per_node, nodes
    per_node_count = devices if isinstance(devices, int) else (
        torch.cuda.device_count() if accelerator == "gpu" and devices == "auto" else 1)
    strategy: str | DDPStrategy = runtime.strategy
    if runtime.strategy == "ddp" or (runtime.strategy == "auto" and per_node_count * num_nodes > 1):
        strategy = DDPStrategy(find_unused_parameters=frozen)
    return {"devices": devices, "num_nodes": num_nodes, "strategy": strategy}


def one_device(runtime: RuntimeSettings) -> RuntimeSettings:
    """``runtime`` on a single device: cross-validation folds and sweep trials train one after another
    in this process, so a multi-process layout is refused."""
    if runtime.num_nodes > 1 or runtime.strategy != "auto" or runtime.devices not in ("auto", "1"):
        raise ChestXrayError("cross-validation and sweeps train on one device in one process: "
                             "leave --devices, --num-nodes and --strategy at their defaults")
    return runtime.replace(devices="1")


def gather_in_order(rows: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``rows`` of an unshuffled ``DistributedSampler`` pass, on every rank, in dataset
    order and without the sampler's padding (its repeated first rows): ``(total, ...)``.

    Rank ``r`` saw the rows ``r, r + world, r + 2 * world, ...`` of the padded index list.
    """
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)[:total]


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "failed to recv", "Socket Timeout")


def peer_lost(err: BaseException) -> str | None:
    """One line for an error that means another process of this distributed launch died or lost its
    connection (a node killed, a worker out of memory), ``None`` for any other error or outside a launch.
    Every surviving rank hits one at its next collective call; there is nothing to continue with."""
    if world_size() <= 1:
        return None
    kind = type(err).__name__
    text = str(err)
    if kind not in ("DistBackendError", "DistNetworkError", "DistStoreError") and not any(m in text for m in _PEER_LOST):
        return None
    return (f"another process of this distributed run ({world_size()} processes) stopped or lost its connection "
            f"({kind}: {text.splitlines()[0][:160] if text else 'no message'}); rank {os.environ.get('RANK', '?')} "
            "stops too. Find the first failure in the other nodes' logs, then rerun the same command on every node "
            "(train: with --resume, from the last checkpoint)")
