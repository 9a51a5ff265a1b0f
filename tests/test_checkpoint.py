"""Atomic saves, verification reasons, quarantine and resume choice, foreign files, check_ckpt."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mapanything_ext.checkpoint import (
    CheckpointWriteError, ForeignCheckpointError, link_on_master, load_checkpoint, prepare_resume, quarantine,
    save_on_master, verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def state(epoch=1, fill=1.0, size=1000):
    return {"model": {"w": torch.full((size,), fill), "b": torch.zeros(3)}, "optimizer": {"state": {}},
            "epoch": epoch, "args": {"train_params": {"epochs": 5}}, "best_so_far": 0.5,
            "resume": {"epoch": epoch, "iteration": 0, "global_step": 10}}


def test_save_writes_a_verified_weights_only_file(tmp_path):
    path = save_on_master(state(), tmp_path / "checkpoint-last.pth")
    result = verify_checkpoint(path)
    assert result.valid and result.epoch == 1 and result.reason == "ok"
    loaded = torch.load(path, weights_only=True)
    assert loaded["format_version"] == 1 and loaded["integrity"]["num_tensors"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_other_ranks_never_touch_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert save_on_master(state(), tmp_path / "c.pth") is None
    assert not list(tmp_path.iterdir())


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        offset = data.find(bytes(torch.full((4,), 7.0).numpy().tobytes()))
        assert offset > 0
        data[offset + 1] ^= 0x01
        path.write_bytes(data)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("this is not a checkpoint\n")


@pytest.mark.parametrize("how,reason", [("truncated", "truncated"), ("flipped", "integrity mismatch"),
                                        ("empty", "empty file"), ("text", "not a torch zip archive")])
def test_damaged_files_are_detected(tmp_path, how, reason):
    path = save_on_master(state(fill=7.0), tmp_path / "checkpoint-last.pth")
    corrupt(path, how)
    result = verify_checkpoint(path)
    assert not result.valid and reason in result.reason


class Payload:
    """Unpickling this runs os.system: the file it would create must never appear."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {}, "epoch": 0, "args": Payload(marker)}, path)
    result = verify_checkpoint(path)
    assert not result.valid and "weights_only" in result.reason
    with pytest.raises(ForeignCheckpointError):
        load_checkpoint(path)
    assert prepare_resume(tmp_path) is None
    assert not marker.exists()
    assert list((tmp_path / "quarantine").rglob("checkpoint-last.pth"))


@pytest.mark.parametrize("edit,reason", [
    (lambda c: c.pop("epoch"), "missing required keys: epoch"),
    (lambda c: c["model"].__setitem__("w", torch.tensor([float("nan")])), "non-finite"),
    (lambda c: c.__setitem__("epoch", 9), "epoch out of range"),
    (lambda c: c["resume"].__setitem__("iteration", -1), "step out of range"),
])
def test_content_problems_are_detected(tmp_path, edit, reason):
    ckpt = state()
    edit(ckpt)
    path = tmp_path / "c.pth"
    save_on_master(ckpt, path)
    result = verify_checkpoint(path)
    assert not result.valid and reason in result.reason


def _with(tensor):
    return lambda c: c["model"].__setitem__("w", tensor)


@pytest.mark.parametrize("edit,finite", [
    (_with(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)), False),
    (_with(torch.tensor([float("-inf"), 2.0], dtype=torch.bfloat16)), False),
    (_with(torch.tensor([torch.finfo(torch.bfloat16).max, -0.0, 1e-40], dtype=torch.bfloat16)), True),
    (_with(torch.tensor([float("inf")], dtype=torch.float16)), False),
    (_with(torch.tensor([0.5, float("nan")], dtype=torch.float64)), False),
    (_with(torch.zeros(3, 4).index_fill_(1, torch.tensor([3]), float("nan")).t()), False),  # strided view
    (_with(torch.full((2, 3), torch.finfo(torch.float32).max).t()), True),
])
def test_every_float_dtype_is_checked_for_nan_and_inf(tmp_path, edit, finite):
    """The finite check reads each dtype's bits its own way (numpy for float16/32/64, the exponent
    bits for bfloat16): a NaN or an infinity in any of them is found, the largest finite value is not."""
    ckpt = state()
    edit(ckpt)
    path = save_on_master(ckpt, tmp_path / "c.pth")
    result = verify_checkpoint(path)
    assert result.valid is finite and (finite or "non-finite" in result.reason)


def test_a_flipped_byte_deep_in_a_record_larger_than_a_read_is_found_and_named(tmp_path):
    """The CRC check reads each record in CRC_CHUNK pieces: a byte flipped in the second piece of a
    large record is found, and the record is named."""
    from mapanything_ext.checkpoint.verify import CRC_CHUNK

    ckpt = state()
    ckpt["model"]["big"] = torch.arange(CRC_CHUNK // 4 + 1024, dtype=torch.float32)
    path = save_on_master(ckpt, tmp_path / "c.pth")
    data = bytearray(path.read_bytes())
    value = CRC_CHUNK // 4 + 100  # an element past the first CRC_CHUNK bytes of the record
    offset = data.find(torch.tensor([float(value)]).numpy().tobytes(), CRC_CHUNK)
    assert offset > CRC_CHUNK
    data[offset] ^= 0x01
    path.write_bytes(data)
    result = verify_checkpoint(path)
    assert not result.valid and "integrity mismatch: CRC-32 of record" in result.reason and "data/" in result.reason


def test_tampered_manifest_is_an_integrity_mismatch(tmp_path):
    path = save_on_master(state(), tmp_path / "c.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["extra"] = torch.ones(2)
    torch.save(ckpt, path)  # a valid archive whose content no longer matches its manifest
    assert "integrity mismatch" in verify_checkpoint(path).reason


def positioned(epoch, step, complete=True):
    ckpt = state(epoch=epoch)
    ckpt["resume"] = {"epoch": epoch, "iteration": 0, "global_step": step, "epoch_complete": complete}
    return ckpt


def test_prepare_resume_quarantines_and_takes_the_newest_valid_position(tmp_path, capsys):
    save_on_master(positioned(1, 20), tmp_path / "checkpoint-1.pth")
    save_on_master(positioned(3, 40), tmp_path / "checkpoint-3.pth")
    save_on_master(positioned(4, 50), tmp_path / "checkpoint-best.pth")
    save_on_master(positioned(4, 57, complete=False), tmp_path / "checkpoint-last.pth")
    corrupt(tmp_path / "checkpoint-last.pth", "truncated")
    (tmp_path / "checkpoint-last.pth.node1-77.tmp").write_bytes(b"half a checkpoint")
    choice = prepare_resume(tmp_path)
    # last is gone, and the best is newer than every numbered one: never a step further back than needed
    assert choice == tmp_path / "checkpoint-best.pth"
    moved = sorted(p.name for p in (tmp_path / "quarantine").rglob("*") if p.is_file())
    assert moved == ["checkpoint-last.pth", "checkpoint-last.pth.node1-77.tmp",
                     "checkpoint-last.pth.node1-77.tmp.reason.json", "checkpoint-last.pth.reason.json"]
    reason = json.loads(next((tmp_path / "quarantine").rglob("checkpoint-last.pth.reason.json")).read_text())
    assert "truncated" in reason["reason"]
    out = capsys.readouterr().out
    assert "resuming from checkpoint-best.pth" in out and "older: checkpoint-3.pth (step 40" in out


def test_a_mid_epoch_last_is_newer_than_the_best_of_the_epoch_before(tmp_path):
    save_on_master(positioned(2, 30), tmp_path / "checkpoint-best.pth")
    save_on_master(positioned(3, 35, complete=False), tmp_path / "checkpoint-last.pth")
    assert prepare_resume(tmp_path) == tmp_path / "checkpoint-last.pth"


def test_linked_names_are_one_file_and_quarantining_one_name_keeps_the_others(tmp_path):
    last = save_on_master(positioned(2, 30), tmp_path / "checkpoint-last.pth")
    for name in ("checkpoint-best.pth", "checkpoint-final.pth"):
        link_on_master(last, tmp_path / name)
    assert len({(tmp_path / n).stat().st_ino for n in ("checkpoint-last.pth", "checkpoint-best.pth",
                                                        "checkpoint-final.pth")}) == 1
    assert (tmp_path / "checkpoint-last.pth").stat().st_nlink == 3  # one checkpoint's disk for three names
    # the next save replaces last with a new file: best and final keep the old state
    save_on_master(positioned(3, 40, complete=False), last)
    assert torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)["resume"]["global_step"] == 30
    assert (tmp_path / "checkpoint-best.pth").stat().st_ino == (tmp_path / "checkpoint-final.pth").stat().st_ino
    assert (tmp_path / "checkpoint-best.pth").stat().st_ino != last.stat().st_ino
    quarantine(tmp_path / "checkpoint-final.pth", "test", tmp_path)
    assert verify_checkpoint(tmp_path / "checkpoint-best.pth").valid
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["resume"]["global_step"] == 40


def test_prepare_resume_says_so_when_starting_fresh(tmp_path, capsys):
    assert prepare_resume(tmp_path) is None
    assert "starting from scratch" in capsys.readouterr().out


def test_foreign_checkpoint_needs_the_trust_switch(tmp_path):
    path = tmp_path / "facebook_map-anything.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": OmegaConf.create({"lr": 1.0})}, path)
    with pytest.raises(ForeignCheckpointError, match="trust_foreign_checkpoints=true"):
        load_checkpoint(path)
    assert torch.equal(load_checkpoint(path, trust_foreign=True)["model"]["w"], torch.ones(2))


def test_file_size_limit_during_save_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure: RLIMIT_FSIZE in a child process makes the disk 'full' mid-save."""
    target = tmp_path / "checkpoint-last.pth"
    save_on_master(state(epoch=1), target)
    before = target.read_bytes()
    code = f"""
import resource, signal, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from mapanything_ext.checkpoint import save_on_master
from tests.test_checkpoint import state
save_on_master(state(epoch=2, size=1_000_000), {str(target)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "CheckpointWriteError" in proc.stderr and "previous file at that path (if any) is untouched" in proc.stderr
    assert target.read_bytes() == before and verify_checkpoint(target).valid
    assert not list(tmp_path.glob("*.tmp"))


SMALL_DISK = """
import os, subprocess, sys
mount = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mount], check=True)
from mapanything_ext.checkpoint import CheckpointWriteError, save_on_master, verify_checkpoint
from tests.test_checkpoint import state
target = os.path.join(mount, "checkpoint-last.pth")
save_on_master(state(epoch=1, size=1000), target)
before = open(target, "rb").read()
try:
    save_on_master(state(epoch=2, size=20_000_000), target)  # 80 MB of tensors on a 16 MB disk
except CheckpointWriteError as err:
    print("REFUSED", err)
assert open(target, "rb").read() == before and verify_checkpoint(target).valid
print("LEFT", sorted(os.listdir(mount)))
"""


def test_a_save_that_cannot_fit_fails_before_writing_and_names_path_and_bytes(tmp_path):
    """A real small filesystem (tmpfs in a private mount namespace, so nothing leaks)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SMALL_DISK,
                           str(mount)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 and ("Operation not permitted" in proc.stderr or "unshare failed" in proc.stderr):
        pytest.skip(f"cannot make a private mount namespace here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"REFUSED not enough free disk space to write checkpoint {mount}/checkpoint-last.pth" in proc.stdout
    needed = int(re.search(r"it needs about ([\d,]+) bytes", proc.stdout).group(1).replace(",", ""))
    assert 80_000_000 < needed < 90_000_000 and "bytes free" in proc.stdout  # 80 MB of tensors + margin
    assert "LEFT ['checkpoint-last.pth']" in proc.stdout  # no temporary file either


def test_write_error_class_is_an_oserror():
    assert issubclass(CheckpointWriteError, OSError)


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "check_ckpt.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_check_ckpt_exit_codes_json_and_quarantine(tmp_path):
    run_dir = tmp_path / "exp"
    save_on_master(state(), run_dir / "checkpoint-last.pth")
    ok = run_tool(run_dir)
    assert ok.returncode == 0 and "OK " in ok.stdout and "epoch=1" in ok.stdout
    save_on_master(state(), run_dir / "sub" / "checkpoint-2.pth")
    corrupt(run_dir / "sub" / "checkpoint-2.pth", "empty")
    bad = run_tool(run_dir, "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert not report["all_valid"] and len(report["files"]) == 2
    moved = run_tool(run_dir / "sub" / "checkpoint-2.pth", "--quarantine")
    assert moved.returncode == 1 and not (run_dir / "sub" / "checkpoint-2.pth").exists()
    assert list((run_dir / "sub" / "quarantine").rglob("checkpoint-2.pth.reason.json"))
    assert run_tool(run_dir).returncode == 0  # quarantine/ folders are skipped
    assert run_tool(tmp_path / "missing").returncode == 2
    assert run_tool("--bogus-flag", run_dir).returncode == 2


UNDER_ULIMIT_V = """
import resource, sys
from pathlib import Path
from mapanything_ext.checkpoint import prepare_resume, verify_checkpoint
import mapanything_ext.checkpoint.verify as verify
verify.time.sleep = lambda s: None  # (the retries' pause)
with open("/proc/self/status") as status:  # the address space in use now, plus 20 MB: the mmap cannot fit
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 20_000_000, resource.RLIM_INFINITY))
folder = Path(sys.argv[1])
print("VERDICT", verify_checkpoint(folder / "checkpoint-last.pth"))
prepare_resume(folder)
"""


def test_a_read_error_of_the_machine_moves_nothing_and_stops_the_job_naming_file_and_errno(tmp_path):
    """A real ENOMEM: the job's address space is capped (ulimit -v, Slurm's VSizeFactor) below the mmap
    of an 80 MB checkpoint. The file is good; it must stay where it is, and the job must say why it stops."""
    save_on_master(positioned(2, 30), tmp_path / "checkpoint-best.pth")
    save_on_master({**positioned(3, 35, complete=False), "model": {"w": torch.ones(20_000_000)}},
                   tmp_path / "checkpoint-last.pth")
    link_on_master(tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-final.pth")
    proc = subprocess.run([sys.executable, "-c", UNDER_ULIMIT_V, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "read_error=True" in proc.stdout and "Cannot allocate memory" in proc.stdout, proc.stdout
    assert "CheckpointReadError: cannot read the run's checkpoints, so the job stops without moving any" in proc.stderr
    assert str(tmp_path / "checkpoint-last.pth") in proc.stderr and "ulimit -v" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "quarantine").exists()
    assert verify_checkpoint(tmp_path / "checkpoint-last.pth").valid  # unlimited again: the file was good
    assert prepare_resume(tmp_path) == tmp_path / "checkpoint-last.pth"


def test_the_resume_sweep_touches_only_our_checkpoint_names(tmp_path):
    save_on_master(positioned(1, 10), tmp_path / "checkpoint-last.pth")
    official = tmp_path / "facebook_map-anything.pth"
    torch.save({"model": {"w": torch.ones(3)}}, official)  # a user's weights file: not one of ours
    (tmp_path / "notes.tmp").write_text("a user's file")
    (tmp_path / "broken.pth").write_bytes(b"not even a zip")
    assert prepare_resume(tmp_path) == tmp_path / "checkpoint-last.pth"
    assert official.is_file() and (tmp_path / "notes.tmp").is_file() and (tmp_path / "broken.pth").is_file()
    assert not (tmp_path / "quarantine").exists()


def test_a_damaged_checkpoint_of_ours_is_never_used_as_weights(tmp_path):
    """model.pretrained and evaluate take an earlier stage's checkpoint-best: a flipped byte in it must
    stop them with the fault, not load a changed weight."""
    from mapanything_ext.checkpoint.load import DamagedCheckpointError, load_verified
    from mapanything_ext.models.pretrained import load_pretrained

    path = save_on_master(state(fill=7.0), tmp_path / "checkpoint-best.pth")
    assert torch.equal(load_verified(path)["model"]["w"], torch.full((1000,), 7.0))
    corrupt(path, "flipped")
    with pytest.raises(DamagedCheckpointError, match="fails verification and is not used: integrity mismatch"):
        load_verified(path)
    model = torch.nn.Linear(1000, 1)
    with pytest.raises(DamagedCheckpointError, match=str(path)):
        load_pretrained(model, path)
    foreign = tmp_path / "their.pth"  # a whole archive not in our format still loads (trusted or not needed)
    torch.save({"model": {"weight": torch.ones(1, 1000), "bias": torch.zeros(1)}}, foreign)
    assert load_pretrained(model, foreign)["loaded"] == 2


def test_check_ckpt_quarantines_nothing_in_a_folder_a_live_job_writes(tmp_path):
    from mapanything_ext.cluster import run_lock

    save_on_master(state(), tmp_path / "checkpoint-last.pth")
    being_written = tmp_path / "checkpoint-last.pth.node1-77.tmp"  # the live job's save in progress
    being_written.write_bytes(b"half of the next checkpoint")
    (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({**run_lock.me(), "pid": os.getpid()}))
    cmd = [sys.executable, str(REPO / "tools" / "check_ckpt.py"), str(tmp_path), "--quarantine"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path} is in use by pid {os.getpid()}" in proc.stderr, proc.stderr
    assert being_written.is_file() and not (tmp_path / "quarantine").exists()
    (tmp_path / run_lock.LOCK_NAME).unlink()  # the job has stopped
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).returncode == 1
    assert not being_written.exists() and (tmp_path / "quarantine").is_dir()



def test_the_quarantine_keeps_torn_temporary_files_of_its_newest_two_batches_only(tmp_path, capsys):
    from mapanything_ext.checkpoint.quarantine import KEPT_TEMPORARY_BATCHES

    for batch in range(4):
        torn = tmp_path / f"checkpoint-last.pth.node1-{batch}.tmp"
        with open(torn, "wb") as handle:  # sparse: the size of a torn 2 GB save, no disk used
            handle.truncate(2_000_000_000)
        quarantine(torn, "leftover temporary file of an interrupted save", tmp_path, f"2026120{batch}T000000Z")
    bad = save_on_master(state(), tmp_path / "checkpoint-3.pth")
    quarantine(bad, "integrity mismatch", tmp_path, "20261201T000001Z")  # an old batch's checkpoint: kept
    left = sorted(p.relative_to(tmp_path / "quarantine").as_posix() for p in (tmp_path / "quarantine").rglob("*.tmp"))
    assert KEPT_TEMPORARY_BATCHES == 2 and left == ["20261202T000000Z/checkpoint-last.pth.node1-2.tmp",
                                                    "20261203T000000Z/checkpoint-last.pth.node1-3.tmp"]
    assert (tmp_path / "quarantine" / "20261201T000001Z" / "checkpoint-3.pth").is_file()
    assert "deleted 1 torn temporary file(s) of older quarantines (2.00 GB" in capsys.readouterr().err
