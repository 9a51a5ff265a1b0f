"""Shared fixtures: one small synthetic OPV2V dataset per test session."""

import pytest

from mapanything_ext.datasets.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """1 scenario per split, 3 frames, 3 vehicles, 160x120 images (about 5 s to render)."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, scenarios=1, frames=3, agents=3, seed=0, width=160, height=120, verbose=False)
    return root


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """Environment for Slurm clients of the project's local 2-node cluster (slurm/cluster.sh)."""
    from tests.slurm_cluster import cluster_env

    yield from cluster_env(tmp_path_factory.mktemp("slurm") / "state")
