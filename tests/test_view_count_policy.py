"""Base dataset view-count policy: fixed counts are enforced, variable counts replace short samples."""

import numpy as np
import pytest
from PIL import Image

from mapanything_ext.datasets.base import BaseMultiViewDataset, RawView, ViewCountError


class Counted(BaseMultiViewDataset):
    """Sample i has counts[i] tiny flat views."""

    def __init__(self, counts, **kw):
        super().__init__(resolution=(28, 14), **kw)
        self.counts = counts

    def __len__(self):
        return len(self.counts)

    def sample_name(self, index):
        return f"sample-{index}"

    def load_raw_views(self, index, rng, num_views=None):
        view = RawView(Image.new("RGB", (28, 14)), np.full((14, 28), 5.0, np.float32),
                       np.array([[10.0, 0, 14], [0, 10.0, 7], [0, 0, 1]]), np.eye(4), "l", f"{index}", True)
        return [view] * self.counts[index]


def test_fixed_count_violation_names_the_sample():
    ds = Counted([4, 3], num_views=4)
    assert len(ds[0]) == 4
    with pytest.raises(ViewCountError, match="sample-1 has 3 views but num_views=4"):
        ds[1]


def test_variable_count_accepts_the_range_and_replaces_short_samples(capsys):
    ds = Counted([2, 5, 1, 6], num_views=6, allow_variable_view_count=True, min_num_views_allowed=2)
    assert [len(ds[i]) for i in (0, 1, 3)] == [2, 5, 6]
    views = ds[2]  # 1 view < minimum: replaced by the next sample, deterministically
    assert len(views) == 6 and views[0]["instance"] == "3"
    assert ds.replaced_samples == 1
    assert "sample-2 has 1 views" in capsys.readouterr().out


def test_too_many_views_is_an_error_even_when_variable():
    with pytest.raises(ViewCountError, match="more than num_views=4"):
        Counted([5], num_views=4, allow_variable_view_count=True)[0]


def test_resolution_must_fit_the_patch_size():
    with pytest.raises(ValueError, match="multiples of 14"):
        BaseMultiViewDataset(num_views=4, resolution=(100, 70))
