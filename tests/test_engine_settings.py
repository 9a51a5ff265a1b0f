"""Settings the engine refuses before it starts anything."""

import pytest
from omegaconf import OmegaConf

from mapanything_ext.train.engine import _check_precision


def test_fp16_without_loss_scaling_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match="amp_dtype=fp16 is not supported.*amp_dtype=bf16.*amp=false"):
        _check_precision(OmegaConf.create({"amp": True, "amp_dtype": "fp16"}))
    _check_precision(OmegaConf.create({"amp": True, "amp_dtype": "bf16"}))
    _check_precision(OmegaConf.create({"amp": False, "amp_dtype": "fp16"}))  # no autocast, nothing to scale
