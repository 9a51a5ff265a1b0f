"""A job stopped between an epoch's saves: the resume gives every due name the epoch's state again."""

import os
import shutil

import pytest

from mapanything_ext.run_log import read_epoch_records
from tests.training_runs import run_training, tiny_overrides

pytestmark = pytest.mark.slow


def test_a_stale_best_is_linked_again_to_the_state_log_txt_reports_best(synthetic_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out, "train_params.epochs=2", "train_params.keep_freq=1")
    assert run_training(overrides).returncode == 0
    records = read_epoch_records(out)
    assert records[1]["OPV2VDataset_loss_med"] < records[0]["OPV2VDataset_loss_med"]  # epoch 2 is the best
    assert os.path.samefile(out / "checkpoint-best.pth", out / "checkpoint-last.pth")
    # What a kill after writing epoch 2's last, before linking best and final, leaves:
    (out / "checkpoint-best.pth").unlink()
    shutil.copyfile(out / "checkpoint-1.pth", out / "checkpoint-best.pth")
    (out / "checkpoint-final.pth").unlink()
    again = run_training(overrides)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("checkpoint-best.pth", "checkpoint-final.pth", "checkpoint-2.pth"):
        assert os.path.samefile(out / name, out / "checkpoint-last.pth"), name
    assert "checkpoint-best.pth, checkpoint-final.pth given the state of epoch 2's end again" in \
        (out / "console.log").read_text()


def test_one_flipped_bit_in_the_file_of_last_best_and_final_costs_one_epoch_not_the_run(synthetic_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out, "train_params.epochs=2")
    assert run_training(overrides).returncode == 0
    last = out / "checkpoint-last.pth"
    assert os.path.samefile(last, out / "checkpoint-best.pth") and os.path.samefile(last, out / "checkpoint-final.pth")
    previous = out / "checkpoint-previous.pth"  # epoch 1's state, which last held before epoch 2's save
    assert previous.is_file() and not os.path.samefile(previous, last)
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the one file behind last, best and final
    last.write_bytes(data)
    again = run_training(overrides)
    assert again.returncode == 0, again.stderr[-2000:]
    console = (out / "console.log").read_text()
    assert "resuming from checkpoint-previous.pth" in console and "starting from scratch" not in console.split(
        "resuming from checkpoint-previous.pth")[0].rsplit("output_dir:", 1)[-1]
    assert [r["epoch"] for r in read_epoch_records(out)][-1] == 2 and (out / "checkpoint-final.pth").is_file()
