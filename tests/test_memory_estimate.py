"""The GPU memory estimate (train/memory_estimate.py) against the peaks measured on the GPU machine,
`distributed.fsdp_offload=auto`, the preflight's memory line and the 24 GB profile (machine=gpu24g)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mapanything_ext.config import compose_training
from mapanything_ext.preflight.memory_check import check_memory
from mapanything_ext.train import memory_estimate, sharding
from mapanything_ext.cluster.distributed import DistInfo

# MapAnything v1.1: parameters in its image encoder and elsewhere, and the float32 bytes FSDP holds
# gathered at its peak (sharding.gathered_bytes of the built model), as counted on the real model.
ENCODER, REST, GATHERED = 683_089_920, 545_401_302, 592_018_904
# (strategy, offload, checkpointing, encoder frozen, images per GPU, measured peak allocated GiB):
# bench/bench_memory.py on one H100 at the stages' budgets (docs/mapanything.md "Memory").
MEASURED = [
    ("ddp", False, False, False, 4, 34.9), ("ddp", False, False, False, 8, 49.2),
    ("ddp", False, True, False, 12, 31.2), ("ddp", False, False, True, 4, 19.5),
    ("ddp", False, False, True, 8, 27.4), ("ddp", False, True, True, 12, 20.8),
    ("fsdp", True, False, False, 4, 16.9), ("fsdp", True, False, False, 8, 31.2), ("fsdp", True, True, False, 4, 10.4),
    ("fsdp", True, True, False, 8, 14.0), ("fsdp", True, True, False, 12, 17.4),
]


def mapanything_sized(encoder_frozen: bool) -> nn.Module:
    """A module with MapAnything's parameter counts on the meta device (no memory)."""
    module = nn.Module()
    module.encoder = nn.Module()
    module.encoder.weight = nn.Parameter(torch.empty(ENCODER, device="meta"), requires_grad=not encoder_frozen)
    module.head = nn.Module()
    module.head.weight = nn.Parameter(torch.empty(REST, device="meta"))
    return module


@pytest.mark.parametrize("strategy,offload,checkpointing,frozen,images,measured", MEASURED)
def test_the_estimate_reproduces_each_measured_peak_within_1_5_gib(strategy, offload, checkpointing, frozen,
                                                                  images, measured):
    estimate = memory_estimate.estimate(
        mapanything_sized(frozen), model_name="mapanything", strategy=strategy, offload=offload, world_size=1,
        images_per_gpu=images, resolution=(518, 392), checkpointing=checkpointing, gathered_bytes=GATHERED)
    assert abs(estimate.total_gib - measured) <= 1.5, (estimate.describe(), measured)


def test_sharding_divides_the_state_by_the_ranks_offload_removes_it_and_pixels_scale_activations():
    module = mapanything_sized(False)
    common = dict(model_name="mapanything", images_per_gpu=4, resolution=(518, 392), checkpointing=False,
                  gathered_bytes=GATHERED)
    ddp = memory_estimate.estimate(module, strategy="ddp", offload=False, world_size=4, **common)
    assert ddp.state_gib == pytest.approx((ENCODER + REST) * 16 / 2**30)  # replicated whatever the ranks
    fsdp4 = memory_estimate.estimate(module, strategy="fsdp", offload=False, world_size=4, **common)
    assert fsdp4.state_gib == pytest.approx(ddp.state_gib / 4)
    assert fsdp4.gathered_gib == pytest.approx(GATHERED / 2**30)
    offloaded = memory_estimate.estimate(module, strategy="fsdp", offload=True, world_size=4, **common)
    assert offloaded.state_gib == 0
    bigger = memory_estimate.estimate(module, strategy="ddp", offload=False, world_size=1,
                                      **{**common, "resolution": (518 * 2, 392)})
    assert bigger.activations_gib == pytest.approx(2 * ddp.activations_gib)
    other = memory_estimate.estimate(module, strategy="ddp", offload=False, world_size=1,
                                     **{**common, "model_name": "compact"})
    assert other.activations_gib is None and "not known" in other.describe()


def test_largest_resolution_takes_one_pair_or_the_largest_of_several():
    assert memory_estimate.largest_resolution([518, 392]) == (518, 392)
    assert memory_estimate.largest_resolution([[518, 336], [518, 518], [518, 392]]) == (518, 518)


def test_sharded_units_hold_only_their_own_weights_gathered():
    blocks = nn.ModuleList(type("Block", (nn.Linear,), {})(10, 10) for _ in range(3))
    model = nn.Module()
    model.trunk = nn.Module()
    model.trunk.blocks = blocks
    model.trunk.norm = nn.LayerNorm(10)
    model.head = nn.Linear(10, 2)
    found_blocks, parts = sharding.shard_units(model)
    assert found_blocks == list(blocks) and parts == [model.trunk, model.head]
    # the trunk's own LayerNorm and the head, and two of the blocks (at work and prefetched)
    assert sharding.gathered_bytes(model) == 4 * (20 + 22 + 2 * 110)


def test_fsdp_offload_takes_true_false_or_auto_and_names_a_bad_value():
    cfg = compose_training(["distributed.strategy=fsdp", "distributed.fsdp_offload=maybe"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False, timeout_s=60)
    with pytest.raises(ValueError, match="fsdp_offload='maybe'"):
        sharding.offload_wanted(nn.Linear(2, 2), cfg, info)
    auto = compose_training(["distributed.strategy=fsdp", "distributed.fsdp_offload=auto"])
    assert sharding.offload_wanted(nn.Linear(2, 2), auto, info) is False  # no GPU: nothing to offload to


def test_the_preflight_warns_before_a_run_that_would_not_fit_the_card():
    fits, too_small = [], []
    for lines, gib in ((fits, 24), (too_small, 0.001)):
        cfg = compose_training([f"machine.gpu_memory_gib={gib}"])
        from mapanything_ext.models.registry import build_model_on

        check_memory(cfg, build_model_on(cfg.model, torch.device("cpu")), lines)
    assert fits[0].startswith("memory: ") and "fits the 24 GiB card" in fits[0]
    assert too_small[0].startswith("WARNING: memory: ") and "machine=gpu24g" in too_small[0]


def test_the_24_gb_profile_sets_fsdp_auto_offload_and_checkpointing_in_every_stage_and_yields_to_the_command_line():
    budgets = {"stage1": 4, "stage2": 8, "stage3": 12}
    for stage, images in budgets.items():
        cfg = compose_training(["machine=gpu24g", f"stage={stage}", "model=mapanything"])
        assert cfg.machine.name == "gpu24g" and cfg.machine.opv2v_root.endswith("data/synthetic/opv2v")
        assert (cfg.distributed.strategy, cfg.distributed.fsdp_offload) == ("fsdp", "auto")
        assert cfg.model.gradient_checkpointing is True
        assert cfg.train_params.max_num_of_imgs_per_gpu == images  # the stage's own budget
    mine = compose_training(["machine=gpu24g", "distributed.strategy=ddp", "model.gradient_checkpointing=false"])
    assert mine.distributed.strategy == "ddp" and mine.model.gradient_checkpointing is False
    assert compose_training([]).distributed.strategy == "ddp"  # the default machine changes nothing
