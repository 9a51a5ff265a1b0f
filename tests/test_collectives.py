"""The collective rule (docs/cluster.md): every collective goes through mapanything_ext.cluster.distributed,
whose helpers put tensors on the backend's device. NCCL serves CUDA tensors only, so a collective
of CPU tensors called anywhere else would stop every multi-GPU job at its first step."""

import re
import signal
import time
from pathlib import Path

import torch

from mapanything_ext.cluster import distributed as dist
from mapanything_ext.cluster.preemption import PreemptionWatcher
from mapanything_ext.readback import HostCopy

REPO = Path(__file__).resolve().parents[1]
# Importing torch.distributed, or calling a collective other than through our helpers (`dist.`).
_DIRECT = re.compile(r"^\s*(import|from)\s+torch\.distributed\b|\btdist\.|torch\.distributed\.(?!run\b)\w+\(|"
                     r"(?<!\bdist)\.(all_reduce|all_gather|all_gather_object|broadcast|broadcast_object_list|"
                     r"reduce_scatter|all_to_all)\(")


# The one exception: train/sharding.py imports FSDP2 and what it is built on (DTensor, the device mesh,
# the full-state-dict helpers). Their collectives run on the mesh's device by construction (the
# mesh is made on the rank's device); sharding.py calls no collective of its own (its broadcast is
# dist.broadcast_module_), and tests/test_gpu.py runs it under NCCL.
_SHARDING = REPO / "mapanything_ext" / "train" / "sharding.py"
_SHARDING_IMPORTS = re.compile(r"^\s*from\s+torch\.distributed\.(fsdp|tensor|device_mesh|checkpoint\.state_dict)\s+import\b")


def test_no_module_but_ours_calls_torch_distributed():
    offenders = []
    for path in sorted((REPO / "mapanything_ext").rglob("*.py")) + sorted((REPO / "hydra_plugins").rglob("*.py")):
        if path == REPO / "mapanything_ext" / "cluster" / "distributed.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path == _SHARDING and _SHARDING_IMPORTS.search(line):
                continue
            if _DIRECT.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "collectives outside mapanything_ext/cluster/distributed.py:\n" + "\n".join(offenders)


def test_helpers_work_without_a_process_group_and_keep_the_callers_device():
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_sum(value), value) and dist.all_reduce_sum(value) is not value
    assert dist.all_reduce_max(value).device == value.device
    assert dist.collective_device() == torch.device("cpu")
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]


def test_a_host_copy_holds_the_values_at_the_time_it_was_made():
    value = torch.tensor([1.0, 2.0])
    copy = HostCopy(value)
    value += 1  # the copy is taken when made, not when read
    assert copy.get().tolist() == [1.0, 2.0] and copy.get().device.type == "cpu"
    assert dist.queue_all_reduce_max(torch.tensor([3.0, -1.0])).get().tolist() == [3.0, -1.0]


def test_the_train_loops_stop_poll_answers_from_the_poll_before():
    watcher = PreemptionWatcher()
    assert not watcher.stop_seen_at_last_poll()  # the first poll has nothing to answer from
    watcher.received, watcher.received_at = signal.SIGUSR2, time.time()
    assert not watcher.stop_seen_at_last_poll()  # answers from the poll before the signal
    assert watcher.stop_seen_at_last_poll()  # the poll that carried it
    assert watcher.stop_requested() and watcher.agreed == signal.SIGUSR2  # the stop itself agrees
