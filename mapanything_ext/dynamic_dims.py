"""The leading dimensions of what a compiled part is called with, marked dynamic for torch.compile.

Stage 3 changes the images per batch (views x samples), the samples and the tokens of all views
from batch to batch. Unmarked, Dynamo compiles a static graph for the first shape and a symbolic one
at the first change, part by part as each part's sizes change (Stage 3's third shape, 8 views of 1
sample after 12 images twice, recompiled the image-batched parts). Marked before the first graph,
one graph per part serves every shape. Dynamo still specializes a size of 1 (a batch of one sample)
and a size the code ties to a constant (a channel count).
"""

from __future__ import annotations

import torch

# Images, samples or views first; samples or tokens second.
LEADING_DIMS = 2


def mark_leading_dims_dynamic(value) -> None:
    """Mark the first LEADING_DIMS dimensions of every tensor in `value` (tensors, lists, tuples and
    dicts of them, nested) as possibly changing, before Dynamo compiles the graph they enter."""
    if torch.is_tensor(value):
        for dim in range(min(value.dim(), LEADING_DIMS)):
            torch._dynamo.maybe_mark_dynamic(value, dim)
    elif type(value) in (list, tuple):
        for item in value:
            mark_leading_dims_dynamic(item)
    elif isinstance(value, dict):
        for item in value.values():
            mark_leading_dims_dynamic(item)
