"""Values read back from the GPU without draining it.

Reading a CUDA tensor on the host (`.item()`, `.tolist()`, `.cpu()`) waits for every kernel
queued before it. Done once per training step, that wait empties the GPU's queue: the next step's
first kernels start only after the host has launched them, and a host-bound forward then leaves
the GPU idle. A `HostCopy` queues the copy into pinned host memory behind the work that produces
the values and marks it with an event; `get()` later waits for that event only, by when the GPU
is usually far past it (the training loop reads a step's values after queuing the next step).
"""

from __future__ import annotations

import torch


class HostCopy:
    """A tensor's values on their way to the host; `get()` returns them (a CPU tensor)."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()  # on the current stream, right behind the copy
        else:
            self._host, self._ready = tensor.to("cpu", copy=True), None

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host
