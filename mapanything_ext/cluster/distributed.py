"""Process-group set-up for torchrun, Slurm/submitit and single-process runs.

Where the rank comes from:
  torchrun      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  Slurm         SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of
                SLURM_JOB_NODELIST, port derived from SLURM_JOB_ID (same on every task)
  neither       one process, no process group

Under torchrun or Slurm the process group exists even at world size 1, so a 1-GPU job takes the
code path of an N-GPU one (DDP, NCCL, every collective below).

The one rule for collectives: every collective of this project goes through the helpers of this
module (a test fails when another module calls torch.distributed). They put tensors on the
backend's device (the rank's GPU under NCCL, which serves CUDA tensors only; the CPU under gloo)
and hand the result back on the caller's device, so callers may pass CPU tensors everywhere.

The collective timeout is TORCH_DIST_TIMEOUT (seconds) when set, else the machine
profile's `dist_timeout_s`, else 7200 s. Ranks first check in on rank 0's TCP store, so
a rank that never starts fails the job in that time with a message naming it, instead
of hanging; the same store then backs the process group.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from mapanything_ext import console
from mapanything_ext.console import say
from mapanything_ext.readback import HostCopy

DEFAULT_TIMEOUT_S = 7200


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    timeout_s: float


class WorldSizeMismatch(RuntimeError):
    """The job got a different number of ranks than the profile or config asked for."""


def resolve_timeout(profile_timeout_s=None) -> float:
    env = os.environ.get("TORCH_DIST_TIMEOUT")
    if env:
        try:
            return float(env)
        except ValueError:
            raise ValueError(f"TORCH_DIST_TIMEOUT={env!r} is not a number of seconds") from None
    return float(profile_timeout_s) if profile_timeout_s else float(DEFAULT_TIMEOUT_S)


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            return prefix
        first = ranges.split(",")[0].split("-")[0]
        return prefix + first


def _launcher_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or Slurm, exporting MASTER_ADDR/PORT for Slurm."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # Same on every task of the job, different between concurrent jobs.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return None


def ranks_per_node(slurm_profile) -> int:
    """One rank per GPU on GPU nodes, else the profile's tasks per node."""
    return int(slurm_profile.get("gpus_per_node") or 0) or int(slurm_profile.get("tasks_per_node") or 1)


def expected_world_size(slurm_profile) -> int | None:
    """Ranks a Slurm job of this profile must have: nodes x ranks per node."""
    if not slurm_profile:
        return None
    return int(slurm_profile.get("nodes") or 1) * ranks_per_node(slurm_profile)


def check_world_size(world_size: int, configured=None, slurm_profile=None) -> None:
    """Stop before any collective when the job got another number of ranks than asked for."""
    if configured is not None and int(configured) != world_size:
        raise WorldSizeMismatch(
            f"distributed.world_size={configured} but the launcher started {world_size} rank(s): "
            f"fix the machine profile (nodes x tasks per node) or distributed.world_size"
        )
    # Only a Slurm job was shaped by the profile; torchrun and plain runs are shaped by their command.
    from_slurm = "SLURM_PROCID" in os.environ and "RANK" not in os.environ
    profile = expected_world_size(slurm_profile) if from_slurm else None
    if profile is not None and profile != world_size:
        raise WorldSizeMismatch(
            f"Slurm job {os.environ.get('SLURM_JOB_ID')} has {world_size} rank(s) (SLURM_NTASKS) but the machine "
            f"profile asks for {profile} (machine.slurm.nodes={slurm_profile.get('nodes')} x tasks per node "
            f"{ranks_per_node(slurm_profile)}); "
            f"submit with the profile's launcher (-m hydra/launcher=submitit_slurm machine=<profile>) or fix it"
        )


def init_distributed_mode(world_size_expected=None, timeout_s=None, backend=None, slurm_profile=None) -> DistInfo:
    timeout = resolve_timeout(timeout_s)
    env = _launcher_env()
    rank, world_size, local_rank = env if env else (0, 1, 0)
    check_world_size(world_size, world_size_expected, slurm_profile)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if rank == 0:
        say("distributed", f"rank 0 of {world_size}; collective timeout {timeout:.0f}s "
              f"({'TORCH_DIST_TIMEOUT' if os.environ.get('TORCH_DIST_TIMEOUT') else 'profile/default'})")
    launched = env is not None
    if launched and not tdist.is_initialized():
        global _STORE
        store = _STORE = _rendezvous(rank, world_size, timeout)
        tdist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), store=store, rank=rank,
                                 world_size=world_size, timeout=datetime.timedelta(seconds=timeout),
                                 device_id=device if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, device, launched, timeout)


# The rendezvous store (served by rank 0's process unless torchrun's agent serves it), kept so that
# cleanup() can let the other ranks let go of it before rank 0 leaves.
_STORE = None


class RanksMissing(RuntimeError):
    """Some ranks of the job never reached the rendezvous within the timeout."""


def _rendezvous(rank: int, world_size: int, timeout: float) -> tdist.TCPStore:
    """Every rank checks in on rank 0's store; on timeout, say which ranks never came."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    where = f"master {host}:{port}"
    # torchrun's agent already serves a store on MASTER_PORT; then every rank is its client.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        base = tdist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent_store,
                              timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    except Exception as err:  # the client could not reach rank 0's store in time
        raise RanksMissing(f"rank {rank}: rank 0 never came up at {where} within {timeout:.0f}s "
                           f"(TORCH_DIST_TIMEOUT / machine.dist_timeout_s). Cause: {err}") from err
    # A restarted torchrun keeps its agent's store: keys of the earlier attempt must not count.
    store = tdist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    store.set(f"mapanything_ext/joined/{rank}", "1")
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world_size) if not store.check([f"mapanything_ext/joined/{r}"])]
        if not missing:
            return store
        if time.monotonic() > deadline:
            raise RanksMissing(
                f"rank {rank}: rank(s) {missing} of {world_size} never joined within {timeout:.0f}s ({where}); "
                f"check that those tasks started (Slurm: same job, same node list) and reached the training "
                f"code. TORCH_DIST_TIMEOUT (seconds) changes the wait."
            )
        time.sleep(0.1)


def is_distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_distributed() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def get_world_size() -> int:
    return tdist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where the backend can reduce tensors: the rank's GPU under NCCL, else the CPU."""
    if is_distributed() and "nccl" in str(tdist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


# Tensors this module handed to the backend, referenced until its threads have let go of them. A
# gloo worker thread drops a finished collective's tensors a moment after the caller has its result.
# Had Python dropped them first, that release must take the GIL, and at interpreter exit taking it
# ends the thread inside a C++ destructor: std::terminate, "terminate called without an active
# exception" (pytorch/pytorch#190489; one rank of a stopping job in about a hundred here). Held from
# Python, the backend's release needs no GIL; cleanup() waits for every release before the exit.
_LENT: list[torch.Tensor] = []


def _lend(*tensors: torch.Tensor) -> None:
    _LENT[:] = [t for t in _LENT if t._use_count() > 1]  # those only Python still holds are done with
    _LENT.extend(tensors)


def _wait_for_backend_release(wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while any(t._use_count() > 1 for t in _LENT) and time.monotonic() < deadline:
        time.sleep(0.001)  # without the GIL: a worker thread finishing its release may need it
    held = sum(t._use_count() > 1 for t in _LENT)
    if held:
        say("distributed", f"the backend still holds {held} tensor(s) of our collectives after {wait_s:.0f}s; "
            f"leaving anyway (the exit may abort: pytorch/pytorch#190489)", every_rank=True)
    _LENT.clear()


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor.clone()
    work = tensor.to(collective_device(), copy=True)
    _lend(work)
    tdist.all_reduce(work, op=op)
    return work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, tdist.ReduceOp.SUM)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / get_world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, tdist.ReduceOp.MAX)


def queue_all_reduce_max(values: torch.Tensor) -> HostCopy:
    """MAX over ranks of a small CPU tensor, queued without waiting for the GPU: under NCCL the
    values go up through pinned memory and come back as a HostCopy, so neither direction drains
    the stream (a plain `.to()` of a CPU tensor does). Same order of collectives on every rank, as
    with any collective."""
    device = collective_device()
    work = values.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else values.clone()
    if is_distributed():
        _lend(work)
        tdist.all_reduce(work, op=tdist.ReduceOp.MAX)
    return HostCopy(work)


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    device = collective_device()
    data = _pickled(obj, device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    _lend(size, *sizes)
    tdist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    _lend(padded, *gathered)
    tdist.all_gather(gathered, padded)
    return [_unpickled(g[:int(s.item())]) for g, s in zip(gathered, sizes)]


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` in place as rank src holds them (as DDP does at its
    construction). They stay on their device: the model sits on the backend's device (its GPU under
    NCCL) when this is called."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            data = tensor.data
            _lend(data)
            tdist.broadcast(data, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank."""
    if not is_distributed():
        return obj
    device = collective_device()
    data = _pickled(obj, device) if get_rank() == src else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.long, device=device)
    _lend(size)
    tdist.broadcast(size, src=src)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _lend(data)
    tdist.broadcast(data, src=src)
    return obj if get_rank() == src else _unpickled(data)


# The object collectives pickle through tensors of this module (torch's own create theirs out of reach
# of _lend). Only the ranks of one job exchange them, as torch's object collectives do.
def _pickled(obj, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _unpickled(data: torch.Tensor):
    return pickle.loads(data.cpu().numpy().tobytes())


def cleanup(graceful: bool = True, wait_s: float = 30.0) -> None:
    """Destroy the process group (every normal exit and every exit for requeue calls this).

    Every rank meets at a barrier, destroys its group and waits until the backend's threads have
    let go of every tensor this module lent them (_LENT: else the exit can abort the process). Rank
    0's process serves the store the others are connected to, so the others then say on the store
    that they are done with it and drop it, and rank 0 waits for them (at most wait_s) before it
    leaves. graceful=False (after an error, when other ranks may be gone): only destroy the group
    and give the backend's threads a moment."""
    global _STORE
    if not is_distributed():
        return
    if not graceful:
        tdist.destroy_process_group()
        _wait_for_backend_release(wait_s=2.0)  # a collective stuck on a lost rank never lets go
        _STORE = None
        return
    rank, world = get_rank(), get_world_size()
    tdist.barrier()
    tdist.destroy_process_group()
    _wait_for_backend_release()
    store, _STORE = _STORE, None
    if store is None or world == 1:
        return
    try:
        if rank != 0:
            store.set(f"mapanything_ext/left/{rank}", "1")
        else:
            store.wait([f"mapanything_ext/left/{r}" for r in range(1, world)], datetime.timedelta(seconds=wait_s))
    except Exception:  # noqa: BLE001 -- a rank already gone: nothing left to wait for
        pass
    del store


console.set_rank_source(get_rank)  # every line the job logs is judged by this rank
