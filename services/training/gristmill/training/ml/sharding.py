"""FSDP for the training loop (``resources.fsdp``): PyTorch's ``fully_shard`` (FSDP2) over the Ray Train workers.

Each worker holds 1/world of every parameter, gradient and optimizer state; a block's full weights exist only
while it runs (all-gathered before its forward and backward, gradients reduce-scattered after). The units are the
blocks transformers declares unsplittable (``_no_split_modules``: the decoder layers), then the root for what is
left (embeddings, the final norm, the head). LoRA adapters shard with their layers; frozen and trainable
parameters share a unit (FSDP2 allows that).

Every function here that gathers is a collective: every rank calls it, in the same order, or the job hangs. Full
tensors land on rank 0 (on the CPU); the other ranks get an empty dict. Loading takes the full tensors on every
rank (each worker reads the checkpoint) and keeps its own shard, with no communication.
"""

from __future__ import annotations

from typing import Any

import torch


class ShardingError(RuntimeError):
    """The model cannot be sharded as asked (a clear message for the job's failure)."""


def block_classes(model: torch.nn.Module) -> frozenset[str]:
    """The class names of the blocks FSDP shards one by one: transformers' ``_no_split_modules``."""
    names = getattr(model, "_no_split_modules", None) or []
    base = getattr(model, "get_base_model", None)
    if not names and callable(base):
        # PEFT wraps the transformers model: ask the model it wraps.
        names = getattr(base(), "_no_split_modules", None) or []
    return frozenset(names)


def shard(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Shard ``model`` (on ``device``) across the ``world_size`` ranks of the default process group, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        raise ShardingError(
            f"FSDP needs the model's transformer blocks (transformers' _no_split_modules) and "
            f"{type(model).__name__} declares none; train it without resources.fsdp"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Put the root's sharded parameters back on the module. FSDP2 keeps the root unsharded after a forward (its
    backward comes at once); after a forward without one (evaluation) the module would go on holding full tensors
    that are not the parameters the optimizer steps, and a state dict would not find them."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def gather_trainable(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The trainable parameters' full values (collective): on the CPU at rank 0, ``{}`` elsewhere. Frozen base
    weights (LoRA) are never gathered: a checkpoint needs only what training changes."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if rank == 0:
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    return out


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set the trainable parameters from their full values (the same dict on every rank); each rank keeps its
    shard. No communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    reshard(model)
    params = dict(model.named_parameters())
    missing = {n for n, p in params.items() if p.requires_grad} - tensors.keys()
    if missing:
        raise RuntimeError(
            f"checkpoint does not match the model: {len(missing)} parameters missing, e.g. {min(missing)}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            param = params[name]
            if isinstance(param, DTensor):
                local = value.to(param.device, param.dtype)
                param.copy_(distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None))
            else:
                param.copy_(value.to(param.device))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (collective): complete at rank 0, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what ``optimizer_state`` saved (the full state on every rank; each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(model)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
