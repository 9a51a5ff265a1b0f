"""How the model is spread over the ranks: `distributed.strategy=ddp` (every rank holds the whole model,
gradients all-reduced) or `fsdp` (PyTorch's FSDP2, `torch.distributed.fsdp.fully_shard`: weights,
gradients and AdamW's moments sharded over the ranks, gathered block by block for compute).

FSDP units, bottom-up: every transformer block (a ModuleList entry whose class name holds "Block":
DINOv2's, the info-sharing blocks, the pose head's), then every top-level part with parameters (the
heads, the encoders' remaining weights), then the model. Weights are gathered in float32 and computed
under the step's bf16 autocast, as under DDP; gradients are reduced in float32; a block gathers its
weights for its forward and again for its backward, a top-level part keeps them from one to the other. `distributed.fsdp_offload=true` keeps the sharded
state in host memory (one small GPU). Everything else is as under DDP: the same optimizer groups, the same clipping (the
global norm over all shards), the same checkpoint, which is gathered to rank 0's host memory tensor
by tensor (never a full copy on a GPU) and stored exactly as a DDP run stores it, so a run resumes
across strategies and world sizes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.console import say
from mapanything_ext.train import memory_estimate

STRATEGIES = ("ddp", "fsdp")


def strategy_of(cfg) -> str:
    strategy = str(cfg.distributed.get("strategy") or "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy


def wrap(module: nn.Module, cfg, info: dist.DistInfo) -> nn.Module:
    """What trains: the module (one process), its DDP wrapper, or the module sharded in place (fsdp,
    at any world size: at 1 it only offloads)."""
    if strategy_of(cfg) == "fsdp":
        return _shard(module, info, offload_wanted(module, cfg, info))
    if not info.distributed:
        return module
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids,
                                   find_unused_parameters=bool(cfg.model.get("find_unused_parameters")))


def offload_wanted(module: nn.Module, cfg, info: dist.DistInfo) -> bool:
    """distributed.fsdp_offload for this rank (auto: decided, and the decision printed)."""
    card = card_gib(cfg, info.device) if info.device.type == "cuda" else None
    offload, without = resolve_offload(module, cfg, info.world_size, card)
    if without is not None:
        say("mapanything_ext", f"distributed.fsdp_offload=auto: without offload {without.describe()} on a "
            f"{card:.0f} GiB card at world size {info.world_size}: {'offloading' if offload else 'not offloading'}")
    return offload


def resolve_offload(module: nn.Module, cfg, world_size: int, card: float | None):
    """(offload, the estimate without it where auto decided): distributed.fsdp_offload true or false as
    set; auto offloads only where the run without it (train/memory_estimate.py) does not fit a card of
    `card` GiB (none known: no offload). The job and the preflight decide alike."""
    value = cfg.distributed.get("fsdp_offload")
    if str(value).lower() != "auto":
        if not isinstance(value, bool) and value is not None:
            raise ValueError(f"distributed.fsdp_offload={value!r}: choose true, false or auto")
        return bool(value), None
    if card is None:
        return False, None
    without = estimate_memory(module, cfg, world_size, offload=False)
    return not memory_estimate.fits(without, card), without


def estimate_memory(module: nn.Module, cfg, world_size: int, offload: bool) -> memory_estimate.MemoryEstimate:
    """One rank's peak GPU memory for a training config (`module` built, its lr-0 parts frozen)."""
    width, height = memory_estimate.largest_resolution(cfg.dataset.get("resolution_train"))
    return memory_estimate.estimate(
        module, model_name=str(cfg.model.get("name")), strategy=strategy_of(cfg), offload=offload,
        world_size=world_size, images_per_gpu=int(cfg.train_params.max_num_of_imgs_per_gpu),
        resolution=(width, height), checkpointing=bool(cfg.model.get("gradient_checkpointing")),
        gathered_bytes=gathered_bytes(module))


def gathered_bytes(module: nn.Module) -> int:
    """The float32 weights a sharded model holds gathered at its peak: every top-level part's, and two
    blocks' (the one at work and the next, prefetched)."""
    blocks, parts = shard_units(module)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    sizes = sorted((sum(p.numel() for p in block.parameters()) for block in blocks), reverse=True)
    # a part's unit holds only its weights outside the blocks (each block is a unit of its own)
    own = {id(p): p.numel() for part in parts for p in part.parameters() if id(p) not in in_blocks}
    return 4 * (sum(own.values()) + sum(sizes[:2]))


def card_gib(cfg, device: torch.device) -> float | None:
    """The GPU memory one rank may use: machine.gpu_memory_gib (an emulated smaller card), else the
    card's; None on a CPU without that setting."""
    limit = cfg.machine.get("gpu_memory_gib")
    if limit:
        return float(limit)
    return torch.cuda.get_device_properties(device).total_memory / memory_estimate.GIB if device.type == "cuda" else None


def offloaded(model: nn.Module, device: torch.device) -> bool:
    """Whether a sharded model computing on `device` keeps its state in host memory."""
    return is_sharded(model) and device.type == "cuda" and next(model.parameters()).device.type == "cpu"


def _shard(module: nn.Module, info: dist.DistInfo, offload: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if offload and info.device.type != "cuda":
        raise ValueError("distributed.fsdp_offload=true needs a GPU (it keeps the sharded state in host memory "
                         "for a GPU's compute); on a CPU leave it false")
    if not info.distributed:
        raise ValueError("distributed.strategy=fsdp needs a process group: launch with torchrun (or Slurm), "
                         "--nproc-per-node 1 on one GPU")
    # Every rank starts from rank 0's weights, as DDP makes them at construction (each rank built its
    # model under its own seed); sharding would keep each rank's own values of its shard otherwise.
    dist.broadcast_module_(module)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # Weights gathered in float32 and computed under the step's bf16 autocast, as under DDP: MapAnything
    # runs parts of its forward with autocast off and expects float32 there (FSDP's bf16 param_dtype
    # would hand those parts bf16 weights), and the numbers stay DDP's.
    options = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
               "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32)}
    # A transformer block frees its gathered weights after its forward and gathers them again for its
    # backward (or its checkpointed recompute): at the peak only the blocks at work hold full weights.
    # The top-level parts keep theirs from forward to backward: MapAnything reaches some of their weights
    # outside their own forward, which a part freed after its forward would have lost by then.
    blocks, parts = shard_units(module)
    for unit in blocks:
        fully_shard(unit, reshard_after_forward=True, **options)
    for unit in parts:
        fully_shard(unit, reshard_after_forward=False, **options)
    fully_shard(module, **options)
    return module


def shard_units(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The FSDP units below the model, each module once: (transformer blocks, the top-level parts with
    parameters outside them)."""
    blocks, seen = [], set()
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            for child in sub:
                if "Block" in type(child).__name__ and id(child) not in seen:
                    blocks.append(child)
                    seen.add(id(child))
    parts = []
    for _, child in module.named_children():
        # (a container has no forward of its own: its entries are the units)
        for part in child if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]:
            part = child[part] if isinstance(child, nn.ModuleDict) else part
            if id(part) not in seen and any(True for _ in part.parameters()):
                parts.append(part)
                seen.add(id(part))
    return blocks, parts


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: gradients reduced only when `sync` (the
    accumulation's last micro-batch), as DDP's no_sync and FSDP's requires_gradient_sync do."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return _Nothing()


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a replicated norm, say) as a plain tensor; others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the module (not its DDP wrapper) as a single process would hold them, optimizer states keyed by
    parameter index as `optimizer.state_dict()` keys them. Sharded: collective, the full tensors on
    rank 0's host (the other ranks get empty dicts)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}, {}
    return tied_as_in(model, _own_storage(model_state)), _own_storage(_by_index(optim_state))


def tied_as_in(model: nn.Module, state: dict) -> dict:
    """A gathered state whose names that are one tensor in the model (MapAnything's DPT head is reachable
    as `dpt_feature_head` and `dense_head.0`, 33 million weights) share one tensor again, as in
    `model.state_dict()`: torch.save then stores it once (0.13 GB less for the v1.1 model)."""
    first: dict[int, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owner = first.setdefault(id(tensor), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def _own_storage(obj):
    """Every tensor with a storage of its own size: a gathered tensor whose first dimension was padded to
    the ranks is a view into the padded buffer, and torch.save writes a tensor's whole storage."""
    if torch.is_tensor(obj):
        return obj.clone() if obj.untyped_storage().nbytes() != obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        return {key: _own_storage(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_own_storage(value) for value in obj]
    return obj


def load_model_state(model: nn.Module, state: dict, strict: bool = True) -> None:
    """Load a full model state dict (every rank holds it), sharding it where the model is sharded."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if strict and (missing or set(state) - set(own)):
        raise RuntimeError(f"state dict does not match the model: missing {missing[:5]}, unexpected "
                           f"{sorted(set(state) - set(own))[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            target = own.get(key)
            if target is None:
                continue
            if isinstance(target, DTensor):
                # Every rank holds the full tensor: each takes its own shard, no communication
                # (weights offloaded to host memory or on the GPU alike).
                value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(value)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict keyed by parameter index (every rank holds it)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(optimizer, model, state),
                             options=StateDictOptions(full_state_dict=True))


def _by_index(state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) -> by index in
    group order (Optimizer.state_dict's, MapAnything's checkpoints')."""
    index, groups = {}, []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _by_name(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> dict:
    """The inverse of _by_index for this optimizer's parameters (their names in the model)."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**saved, "params": [order[i] for i in saved["params"]]} for saved in state["param_groups"]]
    return {"state": {order[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
