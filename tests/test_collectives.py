"""The collective rule (docs/cluster.md): every collective goes through mapanything_ext.distributed,
whose helpers put tensors on the backend's device. NCCL serves CUDA tensors only, so a collective
of CPU tensors called anywhere else would stop every multi-GPU job at its first step."""

import re
from pathlib import Path

import torch

from mapanything_ext import distributed as dist

REPO = Path(__file__).resolve().parents[1]
# Importing torch.distributed, or calling a collective other than through our helpers (`dist.`).
_DIRECT = re.compile(r"^\s*(import|from)\s+torch\.distributed\b|\btdist\.|torch\.distributed\.(?!run\b)\w+\(|"
                     r"(?<!\bdist)\.(all_reduce|all_gather|all_gather_object|broadcast|broadcast_object_list|"
                     r"reduce_scatter|all_to_all)\(")


def test_no_module_but_ours_calls_torch_distributed():
    offenders = []
    for path in sorted((REPO / "mapanything_ext").rglob("*.py")) + sorted((REPO / "hydra_plugins").rglob("*.py")):
        if path == REPO / "mapanything_ext" / "distributed.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _DIRECT.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "collectives outside mapanything_ext/distributed.py:\n" + "\n".join(offenders)


def test_helpers_work_without_a_process_group_and_keep_the_callers_device():
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_sum(value), value) and dist.all_reduce_sum(value) is not value
    assert dist.all_reduce_max(value).device == value.device
    assert dist.collective_device() == torch.device("cpu")
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
