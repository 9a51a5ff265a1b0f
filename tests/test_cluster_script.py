"""slurm/cluster.sh trusts nothing in a state folder it did not make (it runs as root): refused when
another user owns it, others may write it, or it is a symbolic link; stop kills only its own daemons."""

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "cluster.sh"


def cluster(state: Path, command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAPANYTHING_EXT_SLURM_DIR": str(state)}
    return subprocess.run(["bash", str(CLUSTER), command], env=env, capture_output=True, text=True, timeout=60)


def planted(tmp_path: Path) -> Path:
    """A state folder as the script makes it: mode 700, its marker, a munge key of mode 400."""
    state = tmp_path / "state"
    (state / "munge").mkdir(parents=True)
    state.chmod(0o700)
    (state / ".made-by-mapanything-ext-cluster").touch()
    key = state / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return state


@pytest.mark.parametrize("how,reason", [("group_writable", "group or others may write it (mode 770)"),
                                        ("another_user", "it belongs to uid 4242, not to you"),
                                        ("symlink", "it is a symbolic link"),
                                        ("foreign_key", "its munge key was not made by this script")])
def test_a_state_folder_others_could_have_planted_is_refused(tmp_path, how, reason):
    if os.geteuid() != 0 and how in ("another_user", "foreign_key"):
        pytest.skip("handing files to another user needs root")
    state = planted(tmp_path)
    if how == "group_writable":
        state.chmod(0o770)
    elif how == "another_user":
        os.chown(state, 4242, 4242)
    elif how == "foreign_key":
        os.chown(state / "munge" / "munge.key", 4242, 4242)
    elif how == "symlink":
        state.rename(tmp_path / "real")
        state.symlink_to(tmp_path / "real")
    for command in ("start", "stop", "status"):
        out = cluster(state, command)
        assert out.returncode == 1 and f"refusing the state folder {state}: {reason}" in out.stderr, (command, out)


def test_stop_kills_only_processes_of_this_cluster(tmp_path):
    state = planted(tmp_path)
    bystander = subprocess.Popen(["sleep", "60"])  # a process of this user the pid file names
    try:
        (state / "slurmctld.pid").write_text(f"{bystander.pid}\n")
        (state / "munged.pid").write_text(f"{bystander.pid}\n")
        out = cluster(state, "stop")
        assert out.returncode == 0, out.stderr
        time.sleep(0.2)
        assert bystander.poll() is None  # alive: its command line does not name the state folder
        assert not (state / "slurmctld.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
