"""Discriminator heads on tapped backbone features (DMD2 section 4.2: a small conv head on the
fake-score network's bottleneck; the diffusion-GAN reads noisy inputs)."""
from __future__ import annotations

from torch import Tensor, nn


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class ConvHead(nn.Module):
    """Strided conv blocks, global average pool, one logit per sample."""

    def __init__(self, channels: int, hidden: int | None = None, depth: int = 2):
        super().__init__()
        hidden = hidden or channels
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU()]
            c = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(c, 1)

    def forward(self, feat: Tensor) -> Tensor:
        if feat.ndim == 5:          # video features [B, C, F, H, W]: score every frame, average the logits
            b, f = feat.shape[0], feat.shape[2]
            return self.forward(feat.transpose(1, 2).flatten(0, 1)).view(b, f).mean(1)
        h = self.body(feat.float()).mean(dim=(-2, -1))
        return self.out(h).squeeze(-1)
