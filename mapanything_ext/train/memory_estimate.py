"""Peak GPU memory of one rank, estimated before a run starts: the preflight warns with it, and
`distributed.fsdp_offload=auto` offloads only when the sharded run would not fit the card.

The estimate adds three parts, each from what is known before the first step:
- state: float32 weights (4 bytes a parameter), and for every trained parameter its gradient and
  AdamW's two moments (12 bytes). DDP holds all of it on every rank; FSDP 1/world-size of it; FSDP
  with offload none of it (host memory).
- gathered weights (FSDP, train/sharding.py): the top-level parts keep their gathered float32 weights
  from forward to backward; of the transformer blocks, two at a time (the one at work and the next,
  prefetched).
- activations: images per GPU x a per-image figure (scaled by pixels), plus a fixed part, fitted to
  the full MapAnything v1.1 model at 518x392 (bench/bench_memory.py on an H100, docs/mapanything.md
  "Memory"). Both depend on gradient checkpointing and on whether the image encoder trains; with
  checkpointing, the fixed part is larger under fsdp. For another model the activations are not known
  and the estimate says so.

It reproduces every measured peak of that table within 1.5 GiB (tests/test_memory_estimate.py). It is an estimate: the allocator's reserve comes on top (peak reserved was 1.1x to 1.9x
the allocated peak in that table), hence the margin below.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GIB = 2**30
# Activation GiB at the peak, MapAnything v1.1 at 518x392, bf16 autocast, by (gradient checkpointing,
# encoder trained): (per image, fixed under ddp, fixed under fsdp). Fitted to the table's rows less
# their state (18.3 GiB, 10.7 with the encoder frozen) and gathered weights (fsdp, 0.55 GiB):
# - no checkpointing: Stage 1 ddp (34.9 - 18.3) / 4 = 4.15, Stage 2 ddp (49.2 - 18.3) / 8 = 3.86,
#   Stage 1 fsdp+offload (16.9 - 0.55) / 4 = 4.1, Stage 2 (31.2 - 0.55) / 8 = 3.8; the encoder frozen (19.5 - 10.7) / 4, (27.4 - 10.7) / 8;
# - checkpointing: fsdp+offload (machine=gpu24g) 10.4, 14.0, 17.4 GiB at 4, 8, 12 images: 0.9 an image
#   and a fixed 6.8 (6.2 after the 0.55 gathered) that ddp does not have (Stage 3 ddp: 31.2 - 18.3 - 12 x 0.9 = 2.1);
#   the encoder frozen, Stage 3 ddp: (20.8 - 10.7 - 2.1) / 12 = 0.67, its fixed parts taken as above.
ACTIVATION_GIB = {
    (False, True): (4.0, 0.0, 0.0),
    (True, True): (0.9, 2.1, 6.2),
    (False, False): (2.15, 0.0, 0.0),
    (True, False): (0.67, 2.1, 6.2),
}
REFERENCE_PIXELS = 518 * 392
# The part of a card a run may plan for: the allocator's reserve and fragmentation take the rest.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    state_gib: float
    gathered_gib: float
    activations_gib: float | None  # None: not known for this model

    @property
    def total_gib(self) -> float:
        return self.state_gib + self.gathered_gib + (self.activations_gib or 0.0)

    def describe(self) -> str:
        activations = ("activations not known for this model" if self.activations_gib is None
                       else f"activations {self.activations_gib:.1f}")
        return (f"~{self.total_gib:.1f} GiB per GPU at the peak (state {self.state_gib:.1f}, gathered weights "
                f"{self.gathered_gib:.1f}, {activations})")


def estimate(module: nn.Module, *, model_name: str, strategy: str, offload: bool, world_size: int,
             images_per_gpu: int, resolution: tuple[int, int], checkpointing: bool,
             gathered_bytes: int = 0) -> MemoryEstimate:
    """One rank's peak allocated GPU memory; `module` has its frozen parameters' requires_grad off;
    `gathered_bytes`: the full weights FSDP holds at once (sharding.gathered_bytes)."""
    weights = sum(p.numel() for p in module.parameters()) * 4
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    training = sum(p.numel() for _, p in trained) * 12
    if strategy == "ddp":
        state, gathered = weights + training, 0
    else:
        state, gathered = (0 if offload else (weights + training) / max(1, world_size)), gathered_bytes
    activations = None
    if model_name == "mapanything":
        encoder_trains = any(name.startswith("encoder.") for name, _ in trained)
        per_image, fixed_ddp, fixed_fsdp = ACTIVATION_GIB[(bool(checkpointing), encoder_trains)]
        pixels = resolution[0] * resolution[1] / REFERENCE_PIXELS
        activations = images_per_gpu * per_image * pixels + (fixed_ddp if strategy == "ddp" else fixed_fsdp)
    return MemoryEstimate(state / GIB, gathered / GIB, activations)


def largest_resolution(value) -> tuple[int, int]:
    """(width, height) of the largest training resolution: one [w, h] or a list of them."""
    if not value:
        return 518, 392
    pairs = [value] if isinstance(value[0], (int, float)) else list(value)
    width, height = max(((int(w), int(h)) for w, h in pairs), key=lambda wh: wh[0] * wh[1])
    return width, height


def fits(estimate_: MemoryEstimate, card_gib: float) -> bool:
    return estimate_.total_gib <= USABLE_FRACTION * card_gib
