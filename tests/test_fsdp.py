"""distributed.strategy=fsdp (PyTorch's FSDP2) against DDP: two real gloo ranks on the CPU, float32.

The same training (per-step losses and final weights within 1e-5), and one checkpoint format: a
sharded run stopped by a real signal resumes as one DDP rank at the same position, and that one as
two sharded ranks again, each stop written as our single verifiable file.
"""

import pytest
import torch

from mapanything_ext.checkpoint import load_checkpoint, verify_checkpoint
from tests.training_runs import start_ranks, tiny_overrides, wait_all

pytestmark = pytest.mark.slow


def step_losses(out) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train_loss")}


def train(synthetic_root, out, ranks, *extra, env=None):
    out.mkdir(parents=True, exist_ok=True)
    procs = start_ranks(tiny_overrides(synthetic_root, out, "train_params.max_num_of_imgs_per_gpu=4", *extra),
                        ranks, out, env)
    return wait_all(procs, timeout=300)


def test_fsdp_trains_what_ddp_trains_on_two_ranks(synthetic_root, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert train(synthetic_root, ddp, 2, "distributed.strategy=ddp") == [0, 0], (ddp / "rank0.log").read_text()[-3000:]
    assert train(synthetic_root, fsdp, 2, "distributed.strategy=fsdp") == [0, 0], (fsdp / "rank1.log").read_text()[-3000:]
    assert "world size 2 (FSDP)" in (fsdp / "console.log").read_text()
    a, b = step_losses(ddp), step_losses(fsdp)
    assert len(a) >= 8 and a.keys() == b.keys()
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    print(f"\n[fsdp] {len(a)} steps, worst relative loss difference fsdp vs ddp {worst:.2e}")
    assert worst < 1e-5
    assert verify_checkpoint(fsdp / "checkpoint-final.pth").valid  # one file, gathered, ours
    # No gathered tensor drags its padded buffer along (torch.save writes whole storages): the file is
    # DDP's size but for the stored configuration's text.
    raw = torch.load(fsdp / "checkpoint-final.pth", weights_only=True, map_location="cpu")
    tensors = [*raw["model"].values(), *(t for s in raw["optimizer"]["state"].values() for t in s.values())]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    sizes = [(run / "checkpoint-final.pth").stat().st_size for run in (ddp, fsdp)]
    assert abs(sizes[0] - sizes[1]) < 4096, sizes
    wa = load_checkpoint(ddp / "checkpoint-final.pth", map_location="cpu")
    wb = load_checkpoint(fsdp / "checkpoint-final.pth", map_location="cpu")
    assert wa["model"].keys() == wb["model"].keys()
    for key in wa["model"]:
        a_w, b_w = wa["model"][key], wb["model"][key]
        if key.endswith("attn.in_proj_bias"):
            # The key bias (middle third) has a zero gradient in exact arithmetic (softmax ignores a shift
            # of every logit), so AdamW turns rounding noise into lr-sized steps: any change of summation
            # order moves it. Query and value biases are held to the same bound as every other weight.
            third = a_w.numel() // 3
            a_w, b_w = torch.cat([a_w[:third], a_w[2 * third:]]), torch.cat([b_w[:third], b_w[2 * third:]])
        torch.testing.assert_close(b_w, a_w, rtol=1e-5, atol=1e-6)
    # The optimizer state in MapAnything's layout (keyed by parameter index), moments equal.
    assert wa["optimizer"]["state"].keys() == wb["optimizer"]["state"].keys()
    for index, moments in wa["optimizer"]["state"].items():
        torch.testing.assert_close(wb["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"], rtol=1e-4, atol=1e-7)


def test_a_sharded_run_resumes_as_one_ddp_rank_and_back_at_the_same_position(synthetic_root, tmp_path):
    out = tmp_path / "run"
    stop = {"MAPANYTHING_EXT_FAULT": "SIGUSR2@train_step"}
    positions = []
    for ranks, strategy in ((2, "fsdp"), (1, "ddp")):
        codes = train(synthetic_root, out, ranks, f"distributed.strategy={strategy}", env=stop)
        assert set(codes) == {3}, (out / "rank0.log").read_text()[-3000:]  # left for requeue
        assert verify_checkpoint(out / "checkpoint-last.pth").valid
        state = torch.load(out / "checkpoint-last.pth", weights_only=True)["resume"]
        positions.append((state["epoch"], state["consumed"], state["global_step"]))
    assert train(synthetic_root, out, 2, "distributed.strategy=fsdp") == [0, 0], (out / "rank0.log").read_text()[-3000:]
    console = (out / "console.log").read_text()
    resumed = [line for line in console.splitlines() if "] resumed from " in line]
    assert len(resumed) == 2
    for line, (epoch, consumed, step) in zip(resumed, positions):
        assert f"epoch {epoch + 1}, {consumed} batches of it done, global step {step}" in line, (line, positions)
    assert positions[1][1] > positions[0][1]  # the DDP rank went on from where the shards stopped
    assert verify_checkpoint(out / "checkpoint-final.pth").valid


def test_fsdp_without_a_process_group_and_offload_on_a_cpu_are_refused_with_the_reason(synthetic_root, tmp_path):
    from tests.training_runs import run_training

    alone = run_training(tiny_overrides(synthetic_root, tmp_path / "alone", "distributed.strategy=fsdp"))
    assert alone.returncode != 0 and "distributed.strategy=fsdp needs a process group" in alone.stderr
    out = tmp_path / "offload"
    out.mkdir()
    codes = train(synthetic_root, out, 1, "distributed.strategy=fsdp", "distributed.fsdp_offload=true")
    assert codes == [1]
    assert "distributed.fsdp_offload=true needs a GPU" in (out / "rank0.log").read_text()


def test_a_sharded_model_takes_model_pretrained_and_evaluates_as_ddp_does(synthetic_root, tmp_path):
    """model.pretrained goes into the shards (each rank its own part of the full tensors); the evaluation
    before training, where the ranks hold unequal shares of the test batches, gives DDP's numbers."""
    import json

    source = tmp_path / "source"
    assert train(synthetic_root, source, 1, "train_params.epochs=1") == [0]
    stats = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        codes = train(synthetic_root, out, 2, f"distributed.strategy={strategy}", "train_params.epochs=1",
                      f"model.pretrained={source / 'checkpoint-final.pth'}", "train_params.eval_before_training=true",
                      "train_params.max_steps_per_epoch=1")
        assert codes == [0, 0], (out / "rank0.log").read_text()[-3000:]
        assert "(every entry matched)" in (out / "console.log").read_text()
        stats[strategy] = json.loads((out / "initial_eval.json").read_text())
    assert stats["ddp"].keys() == stats["fsdp"].keys()
    for key, value in stats["ddp"].items():
        assert abs(stats["fsdp"][key] - value) <= 1e-5 * max(abs(value), 1e-6), key


def test_names_of_one_tensor_share_it_again_in_a_gathered_state():
    """MapAnything reaches its DPT head under two names; a gathered full state holds a copy per name,
    which torch.save would store twice (0.13 GB for the v1.1 model). They share one tensor again."""
    from torch import nn

    from mapanything_ext.train.sharding import tied_as_in

    model = nn.Module()
    model.head = nn.Linear(3, 2)
    model.alias = nn.ModuleList([model.head])
    gathered = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert gathered["head.weight"] is not gathered["alias.0.weight"]
    state = tied_as_in(model, gathered)
    assert state["alias.0.weight"] is state["head.weight"] and state["alias.0.bias"] is state["head.bias"]
