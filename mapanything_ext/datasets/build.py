"""A dataset from its config node: what training and evaluation both need, owned by neither."""

from __future__ import annotations

from hydra.utils import instantiate


def build_dataset(node):
    """Instantiate one dataset node (`_target_` + constructor kwargs) from the dataset config."""
    return instantiate(node, _convert_="all")
