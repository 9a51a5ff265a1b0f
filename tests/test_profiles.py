"""Machine profiles drive the launchers: every Slurm parameter comes from machine.slurm."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mapanything_ext.cluster.distributed import expected_world_size
from mapanything_ext.config import CONFIG_DIR

PROFILES = sorted(p.stem for p in (CONFIG_DIR / "machine").glob("*.yaml"))


def launcher_config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_shipped_profiles():
    assert {"local", "local3090", "multinode_example", "slurm-test"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_slurm_launcher_takes_every_parameter_from_the_profile(profile):
    cfg = launcher_config("hydra/launcher=submitit_slurm", f"machine={profile}")
    launcher, slurm = cfg.hydra.launcher, cfg.machine.slurm
    for key in ("partition", "account", "qos", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                "mem_gb", "timeout_min", "max_num_timeout", "signal_delay_s"):
        assert launcher[key] == slurm[key], key
    assert OmegaConf.to_container(launcher.additional_parameters) == OmegaConf.to_container(slurm.additional_parameters)
    assert launcher._target_ == "hydra_plugins.mapanything_ext_launcher.SlurmLauncher"


def test_command_line_wins_over_the_profile():
    cfg = launcher_config("hydra/launcher=submitit_slurm", "machine=multinode_example", "hydra.launcher.partition=debug",
                          "machine.slurm.nodes=4")
    assert cfg.hydra.launcher.partition == "debug"
    assert cfg.hydra.launcher.nodes == 4


def test_local_launcher_follows_the_profile_too():
    cfg = launcher_config("hydra/launcher=submitit_local", "machine=slurm-test")
    assert cfg.hydra.launcher.tasks_per_node == 2


def test_world_size_of_the_profiles():
    sizes = {p: expected_world_size(launcher_config(f"machine={p}").machine.slurm) for p in PROFILES}
    assert sizes["multinode_example"] == 8 and sizes["slurm-test"] == 2 and sizes["local3090"] == 5
