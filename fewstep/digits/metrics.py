"""Digits metrics: a small bundled classifier, class accuracy, and FD-digits.

FD-digits is the Frechet distance between Gaussians fitted to the penultimate-layer features of
`DigitsNet` (a CNN trained on the bundled digits by `train/classifier.py`), computed as
    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
(Dowson & Landau 1982; the same formula FID applies to Inception features, Heusel et al. 2017,
arXiv 1706.08500). FD-digits is NOT FID: the feature network, its resolution and its scale differ,
so its numbers are only comparable with other FD-digits numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from fewstep.digits import DIGITS_NET, DIGITS_NET2
from fewstep.digits.data import NUM_CLASSES, load_digits, random_shift

DIGITS_NET_DIR = DIGITS_NET
IMAGE_SIZE = 16


class DigitsNet(nn.Module):
    """Three 3x3 SiLU conv stages (16x16 -> 8x8 -> 4x4), a `feature_dim` penultimate layer, then logits."""

    def __init__(self, channels=(16, 32, 64), feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"channels": list(channels), "feature_dim": feature_dim, "num_classes": num_classes,
                       "image_size": IMAGE_SIZE}
        c1, c2, c3 = channels
        self.convs = nn.ModuleList([nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1),
                                    nn.Conv2d(c2, c3, 3, padding=1)])
        self.fc = nn.Linear(c3 * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations `[B, feature_dim]` for images `[B, 1, 16, 16]` in [-1, 1]."""
        h = F.silu(self.convs[0](x))
        h = F.max_pool2d(F.silu(self.convs[1](h)), 2)
        h = F.max_pool2d(F.silu(self.convs[2](h)), 2)
        # SiLU, not ReLU: ReLU left half of the 64 feature units dead, wasting FD-digits dimensions
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_digits_net(net: DigitsNet, out_dir: str | Path) -> None:
    """Write `model.safetensors` and `config.json` (the constructor arguments) into `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(net.config, indent=2) + "\n")


def load_digits_net(path: str | Path | None = None) -> DigitsNet:
    """Load the committed classifier (default: `fewstep/assets/digits_net/`), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DIGITS_NET_DIR
    cfg = json.loads((path / "config.json").read_text())
    net = DigitsNet(cfg["channels"], cfg["feature_dim"], cfg["num_classes"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return net.eval()


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """Clamp to the data range and bring images to 16x16 so the classifier sees its training input."""
    x = images.detach().float().cpu().clamp(-1.0, 1.0)
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def _apply(net: nn.Module, images: torch.Tensor, fn: str, batch_size: int = 500) -> torch.Tensor:
    x = _prepare(images)
    net = net.eval()
    return torch.cat([getattr(net, fn)(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def extract_features(images: torch.Tensor, net: DigitsNet | None = None) -> torch.Tensor:
    """DigitsNet penultimate features `[N, D]` of images `[N, 1, H, W]` in [-1, 1]."""
    return _apply(net if net is not None else load_digits_net(), images, "features")


def predicted_classes(images: torch.Tensor, net: DigitsNet | None = None) -> torch.Tensor:
    """The classifier's class `[N]` for images `[N, 1, H, W]` in [-1, 1]."""
    return _apply(net if net is not None else load_digits_net(), images, "forward").argmax(1)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor, net: DigitsNet | None = None) -> float:
    """Fraction of images that the classifier assigns to their intended label."""
    return (predicted_classes(images, net) == labels.cpu()).float().mean().item()


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and unbiased covariance `[D, D]` of features `[N, D]`, in float64."""
    f = feats.detach().cpu().double().numpy() if torch.is_tensor(feats) else np.asarray(feats, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    The matrix square root of S1 S2 comes from scipy.linalg.sqrtm; round-off can give it a tiny
    imaginary part (kept out: real part only) or, for singular covariances, non-finite entries
    (then retried with eps * I added to both covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(sigma1.shape[0])
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def real_stats(net: DigitsNet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of all 1,797 real digits (the default FD-digits reference)."""
    x0, _ = load_digits(IMAGE_SIZE)
    return feature_stats(extract_features(x0, net))


def fd_digits(images: torch.Tensor, net: DigitsNet | None = None, reference=None) -> float:
    """FD-digits between generated `images` and a reference.

    `reference` is None (all 1,797 real digits), an image tensor `[M, 1, H, W]`, or a `(mu, sigma)` pair.
    Like any Frechet distance it is biased upward for small sample sizes: compare runs at equal N.
    """
    net = net if net is not None else load_digits_net()
    if reference is None:
        mu_r, sigma_r = real_stats(net)
    elif torch.is_tensor(reference):
        mu_r, sigma_r = feature_stats(extract_features(reference, net))
    else:
        mu_r, sigma_r = reference
    mu_g, sigma_g = feature_stats(extract_features(images, net))
    return frechet_distance(mu_g, sigma_g, mu_r, sigma_r)


def real_floor(net: DigitsNet | None = None, num_splits: int = 5, seed: int = 0) -> tuple[float, float]:
    """Real-vs-real floor: FD-digits between two disjoint random halves of the real digits.

    Returns (mean, std) over `num_splits` random splits. A generator cannot be expected to score below
    this at ~900 samples per side; with more samples per side the floor shrinks (the estimator's bias).
    """
    net = net if net is not None else load_digits_net()
    x0, _ = load_digits(IMAGE_SIZE)
    feats = extract_features(x0, net)
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_splits):
        perm = torch.randperm(len(feats), generator=g)
        half = len(feats) // 2
        a, b = feats[perm[:half]], feats[perm[half: 2 * half]]
        values.append(frechet_distance(*feature_stats(a), *feature_stats(b)))
    return float(np.mean(values)), float(np.std(values))


def train_digits_net(x0: torch.Tensor, labels: torch.Tensor, steps: int = 1500, batch_size: int = 128,
                     lr: float = 2e-3, max_shift: int = 2, seed: int = 0, log_every: int = 250) -> DigitsNet:
    """Train DigitsNet with AdamW, cosine lr decay and random shifts of up to `max_shift` pixels."""
    torch.manual_seed(seed)
    return fit_digits_classifier(DigitsNet(), x0, labels, steps, batch_size, lr, max_shift, seed, log_every)


# ----------------------------------------------------------------------------------------------------------------
# The second, independently trained feature net (`train/classifier2.py`, weights in `fewstep/assets/digits_net2/`).
# It differs from DigitsNet in everything but the task: four convolutions instead of three, a 5x5 first kernel,
# strided convolutions instead of max-pooling, GELU instead of SiLU, other widths, 48-d features, and seed 1 (also
# a different train / held-out split). A quality figure that moves with one net but not the other says more about
# that net than about the samples.

DIGITS_NET2_DIR = DIGITS_NET2


class DigitsNet2(nn.Module):
    """Four GELU conv layers (5x5 at 16x16, stride-2 3x3 to 8x8, 3x3, stride-2 3x3 to 4x4), `feature_dim` features."""

    def __init__(self, channels=(16, 32, 32, 64), feature_dim: int = 48, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = {"architecture": "DigitsNet2", "channels": list(channels), "feature_dim": feature_dim,
                       "num_classes": num_classes, "image_size": IMAGE_SIZE}
        c1, c2, c3, c4 = channels
        self.convs = nn.ModuleList([nn.Conv2d(1, c1, 5, padding=2), nn.Conv2d(c1, c2, 3, stride=2, padding=1),
                                    nn.Conv2d(c2, c3, 3, padding=1), nn.Conv2d(c3, c4, 3, stride=2, padding=1)])
        self.fc = nn.Linear(c4 * (IMAGE_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations `[B, feature_dim]` for images `[B, 1, 16, 16]` in [-1, 1]."""
        h = x
        for conv in self.convs:
            h = F.gelu(conv(h))
        return F.gelu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_net2(path: str | Path | None = None) -> DigitsNet2:
    """Load the second committed feature net (default: `fewstep/assets/digits_net2/`), in eval mode.

    Works wherever a DigitsNet does: `extract_features`, `class_accuracy`, `fd_digits`, `real_stats` and the
    functions of `fewstep.digits.quality` all take it as their `net`.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DIGITS_NET2_DIR
    cfg = json.loads((path / "config.json").read_text())
    net = DigitsNet2(cfg["channels"], cfg["feature_dim"], cfg["num_classes"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return net.eval()


def fit_digits_classifier(net: nn.Module, x0: torch.Tensor, labels: torch.Tensor, steps: int = 1500,
                          batch_size: int = 128, lr: float = 2e-3, max_shift: int = 2, seed: int = 0,
                          log_every: int = 250) -> nn.Module:
    """The optimisation of `train_digits_net` for any classifier `net`: AdamW (weight decay 1e-4), cosine lr decay,
    random shifts of up to `max_shift` pixels, batches drawn with a generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(x0), (batch_size,), generator=g)
        x = random_shift(x0[idx], max_shift, generator=g)
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss/classifier/ce {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    return net.eval()


def train_digits_net2(x0: torch.Tensor, labels: torch.Tensor, steps: int = 1500, batch_size: int = 128,
                      lr: float = 2e-3, max_shift: int = 2, seed: int = 1, log_every: int = 250) -> DigitsNet2:
    """Train DigitsNet2 (initialised from `seed`) exactly as `train_digits_net` trains DigitsNet."""
    torch.manual_seed(seed)
    net = DigitsNet2()
    return fit_digits_classifier(net, x0, labels, steps, batch_size, lr, max_shift, seed, log_every)
