"""Optimizers and learning-rate schedules, one per turn."""
from __future__ import annotations

import torch


def build(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (DMD2's choice: betas (0.9, 0.999), weight decay 0.01) with linear warm-up then constant lr."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            eps=cfg.eps)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / warm) if warm else 1.0)
    return opt, sched
