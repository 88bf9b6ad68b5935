"""The bundled digits data: scikit-learn's handwritten digits, upsampled, in [-1, 1].

`sklearn.datasets.load_digits()` ships 1,797 labelled 8x8 images with 17 grey levels (0..16) inside the
scikit-learn wheel, so the default teacher, classifier and students need no network.
Images are mapped linearly to [-1, 1] (0 -> -1, 16 -> 1) and upsampled bilinearly with
`align_corners=False` and no antialiasing, so the result is a fixed, deterministic function of the data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_CLASS = 10  # extra label used as the unconditional input for classifier-free guidance
NUM_DIGITS = 1797


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(x0, labels)`: float32 images `[1797, 1, size, size]` in [-1, 1] and int64 labels `[1797]`."""
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    x0 = torch.from_numpy(data.images.astype(np.float32))[:, None] / 8.0 - 1.0
    if size != 8:
        x0 = F.interpolate(x0, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    labels = torch.from_numpy(data.target.astype(np.int64))
    return x0.contiguous(), labels


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] on both axes.

    Uncovered pixels take the background value -1 (not a wrap-around), so a digit never re-enters
    from the opposite border. No flips: a mirrored digit is a different (or no) digit.
    """
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (torch.arange(h)[None] + dy[:, None]).to(x.device)  # [B, H]
    cols = (torch.arange(w)[None] + dx[:, None]).to(x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def stratified_split(labels: torch.Tensor, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split of indices into (train, held-out), `holdout` fraction of each class."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for k in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(holdout * len(idx)))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values

