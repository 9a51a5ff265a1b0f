"""The built-in compact multi-view model.

A small alternating-attention network with MapAnything's prediction contract, so the
whole pipeline (data, engine, checkpoints, Slurm, evaluation) runs and learns on a
CPU in minutes. Architecture, per sample of V views:

  patch embedding (conv, stride = patch) + 2-D sinusoidal positions + reference-view embedding
  -> blocks alternating frame attention (tokens of one view) and global attention (all views)
  -> dense head: per-patch linear to patch*patch pixels, refined by a 3x3 conv that also
     sees the input image and pixel coordinates (ray direction, depth along ray, confidence)
  -> pose head per view (translation + x-y-z-w quaternion, in the first view's camera frame)
  -> scale head on a learned scale token (metric scaling factor)

Outputs are metric: depth, points and translations are multiplied by the predicted
metric scaling factor, as MapAnything's are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mapanything_ext.geometry.rotations import quaternion_to_matrix

# Typical OPV2V depth in metres; the scale head starts there so early steps are sane.
_INITIAL_SCALE_M = 10.0


def sincos_2d(h: int, w: int, dim: int, device) -> torch.Tensor:
    """Fixed 2-D sine/cosine position codes (h*w, dim), so any resolution works."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, device=device) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    return F.pad(codes, (0, dim - codes.shape[1]))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CompactMapAnything(nn.Module):
    def __init__(
        self,
        patch_size: int = 14,
        dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.dim = dim
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.view_embed = nn.Embedding(2, dim)  # 0: reference (first) view, 1: others
        self.scale_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Even blocks attend within a view, odd blocks across all views.
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, dropout) for _ in range(2 * depth))
        self.head_norm = nn.LayerNorm(dim)
        self.dense_head = nn.Linear(dim, patch_size * patch_size * 5)
        self.refine = nn.Sequential(nn.Conv2d(5 + 3 + 2, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 5, 3, padding=1))
        self.pose_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 7))
        self.scale_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.constant_(self.scale_head[-1].bias, math.log(_INITIAL_SCALE_M))
        nn.init.zeros_(self.scale_head[-1].weight)

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _encode(self, imgs: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """imgs (B*V,3,H,W) -> view tokens (B, V, N, D), scale token (B, 1, D), patch grid (h, w)."""
        tokens = self.patch_embed(imgs)  # (B*V, D, h, w)
        bv, d, h, w = tokens.shape
        batch = bv // num_views
        tokens = tokens.flatten(2).transpose(1, 2) + sincos_2d(h, w, d, imgs.device)
        view_ids = torch.ones(num_views, dtype=torch.long, device=imgs.device)
        view_ids[0] = 0
        tokens = tokens.view(batch, num_views, h * w, d) + self.view_embed(view_ids)[None, :, None, :]
        scale = self.scale_token.expand(batch, 1, d)
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:
                tokens = self._run_block(block, tokens.reshape(bv, h * w, d)).view(batch, num_views, h * w, d)
            else:
                joint = torch.cat([tokens.reshape(batch, num_views * h * w, d), scale], dim=1)
                joint = self._run_block(block, joint)
                tokens, scale = joint[:, :-1].view(batch, num_views, h * w, d), joint[:, -1:]
        return self.head_norm(tokens), self.head_norm(scale), (h, w)

    def _dense(self, tokens: torch.Tensor, imgs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-pixel raw outputs (B*V, 5, H, W) from patch tokens and the input image."""
        h, w = grid
        p = self.patch_size
        raw = self.dense_head(tokens.reshape(-1, h * w, self.dim))  # (B*V, N, p*p*5)
        raw = raw.view(-1, h, w, 5, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, 5, h * p, w * p)
        # Normalised pixel coordinates let the head learn the smooth per-pixel ray field directly.
        ys = torch.linspace(-1, 1, h * p, device=imgs.device).view(1, 1, -1, 1).expand(imgs.shape[0], 1, h * p, w * p)
        xs = torch.linspace(-1, 1, w * p, device=imgs.device).view(1, 1, 1, -1).expand(imgs.shape[0], 1, h * p, w * p)
        return raw + self.refine(torch.cat([raw, imgs, xs, ys], dim=1))

    def forward(self, views: list[dict]) -> list[dict]:
        num_views = len(views)
        imgs = torch.stack([v["img"] for v in views], dim=1)  # (B, V, 3, H, W)
        batch, _, _, height, width = imgs.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {width}x{height} is not a multiple of the patch size {p}")
        flat = imgs.flatten(0, 1)
        tokens, scale_tok, grid = self._encode(flat, num_views)
        dense = self._dense(tokens, flat, grid).view(batch, num_views, 5, height, width)
        pose = self.pose_head(tokens.mean(dim=2))  # (B, V, 7)
        metric_scale = self.scale_head(scale_tok[:, 0]).clamp(-10, 10).exp()  # (B, 1)
        return [self._view_outputs(dense[:, i], pose[:, i], metric_scale) for i in range(num_views)]

    @staticmethod
    def _view_outputs(dense: torch.Tensor, pose: torch.Tensor, metric_scale: torch.Tensor) -> dict:
        rays = F.normalize(dense[:, 0:3].permute(0, 2, 3, 1), dim=-1)
        depth = dense[:, 3:4].permute(0, 2, 3, 1).clamp(-10, 10).exp() * metric_scale[:, None, None, :]
        conf = 1.0 + dense[:, 4].clamp(max=20).exp()
        quats = F.normalize(pose[:, 3:7] + pose.new_tensor([0, 0, 0, 1.0]), dim=-1)
        trans = pose[:, 0:3] * metric_scale
        pts_cam = rays * depth
        rot = quaternion_to_matrix(quats)
        pts_world = torch.einsum("bij,bhwj->bhwi", rot, pts_cam) + trans[:, None, None, :]
        return {
            "ray_directions": rays,
            "depth_along_ray": depth,
            "pts3d_cam": pts_cam,
            "pts3d": pts_world,
            "cam_trans": trans,
            "cam_quats": quats,
            "metric_scaling_factor": metric_scale,
            "conf": conf,
        }
