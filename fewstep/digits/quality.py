"""Digits sample quality beyond class accuracy and FD-digits: precision / recall, per-class FD, memorisation.

- Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
  Models", arXiv 1904.06991). Each real feature vector gets a hypersphere whose radius is the distance to its k-th
  nearest real neighbour (k = 3, itself excluded); precision is the fraction of generated features inside at least
  one real hypersphere (are the samples realistic?), recall the fraction of real features inside at least one
  generated hypersphere built the same way from the generated set (is the real data covered?). Distances are exact
  (all pairs, float64, no approximate nearest neighbours), computed in row blocks so memory stays bounded. Both
  figures depend on the sample sizes and on k: compare runs at equal N.
- Per-class FD: FD-digits of each class's samples against the real digits of that class. FD-digits of a mixture
  can look fine while one class is poor (or stands in for another); this breaks it down. About 180 real digits per
  class against 48- or 64-d features: the per-class figures are noisier and more biased than the overall one.
- Memorisation: each sample's pixel-space L2 distance to its nearest training image, for the student and for the
  teacher it was distilled from; `copies` says whether the student sits systematically closer to the training set
  than the teacher does (the rule is on `memorisation`).

Every function that takes a `net` works with either feature net: `metrics.load_digits_net()` (the default) or
`metrics.load_digits_net2()`. `quality_report` gathers everything for a training report.

The 1,797 real digits are the reference of every figure, so their features are extracted once per process and
feature net (`real_features`, keyed by the net's weights) and the copy threshold of the default training set is
computed once per process: scoring three seeds, or a teacher's whole grid, no longer repeats that work.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from fewstep.digits import metrics
from fewstep.digits.data import load_digits

K = 3                       # the paper's recommended neighbourhood size
ROWS = 512                  # rows of the distance matrix computed at a time
COPY_FRACTION_MARGIN = 0.05  # `copies` if the student's near-copy fraction exceeds the teacher's by this much ...
COPY_MEDIAN_RATIO = 0.75     # ... or its median nearest-training distance is below this fraction of the teacher's
_REAL_FEATURES: dict = {}    # per process: (net class, weights sha1) -> (real features [1797, D], labels [1797])
_COPY_THRESHOLD: list = []   # per process: copy_threshold() of the default training set (all 1,797 digits)


def _as_float64(x) -> torch.Tensor:
    t = x.detach().cpu() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return t.double().flatten(1) if t.dim() > 2 else t.double()


def _distances(a: torch.Tensor, b: torch.Tensor, rows: int = ROWS):
    """Yield `(start, block)`: exact Euclidean distances `[<=rows, len(b)]` from rows `a[start:start+rows]` to `b`.

    The difference-based kernel (no `|a|^2 + |b|^2 - 2ab` expansion) keeps the self distance exactly 0 and the
    values free of cancellation error, so a point always lies inside its own hypersphere.
    """
    for start in range(0, len(a), rows):
        yield start, torch.cdist(a[start: start + rows], b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats, k: int = K, rows: int = ROWS) -> torch.Tensor:
    """Distance `[N]` (float64) from each row of `feats` `[N, D]` to its k-th nearest other row (itself excluded)."""
    f = _as_float64(feats)
    if not 1 <= k < len(f):
        raise ValueError(f"k = {k} needs 1 <= k < N = {len(f)}")
    radii = torch.empty(len(f), dtype=torch.float64)
    for start, d in _distances(f, f, rows):
        n = len(d)
        d[torch.arange(n), torch.arange(start, start + n)] = math.inf   # exclude the point itself (by index)
        radii[start: start + n] = d.kthvalue(k, dim=1).values
    return radii


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, rows: int) -> float:
    """Fraction of `points` within `radii[j]` (inclusive) of at least one `centres[j]`."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for start, d in _distances(points, centres, rows):
        inside[start: start + len(d)] = (d <= radii[None]).any(1)
    return inside.double().mean().item()


def precision_recall(real_feats, fake_feats, k: int = K, rows: int = ROWS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake_feats` `[M, D]` against `real_feats` `[N, D]`.

    Tensors or arrays; computed exactly in float64. 2000 x 1797 64-d features take well under a second on one
    CPU thread. `rows` only bounds memory (results do not depend on it).
    """
    real, fake = _as_float64(real_feats), _as_float64(fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {tuple(real.shape)}, fake {tuple(fake.shape)}")
    precision = _coverage(fake, real, knn_radii(real, k, rows), rows)
    recall = _coverage(real, fake, knn_radii(fake, k, rows), rows)
    return precision, recall


def _weights_key(net) -> tuple:
    """What a net's features depend on: its class and a hash of its weights (a retrained net gets its own entry)."""
    sha = hashlib.sha1()
    for name, t in net.state_dict().items():
        sha.update(name.encode())
        sha.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return type(net).__qualname__, sha.hexdigest()


def real_features(net) -> tuple[torch.Tensor, torch.Tensor]:
    """`(features [1797, D], labels [1797])` of all real digits in `net`, extracted once per process and net weights
    (the same tensors as `metrics.extract_features(load_digits(16)[0], net)`). Shared: callers must not modify them."""
    key = _weights_key(net)
    if key not in _REAL_FEATURES:
        real_x, real_y = load_digits(metrics.IMAGE_SIZE)
        _REAL_FEATURES[key] = (metrics.extract_features(real_x, net), real_y)
    return _REAL_FEATURES[key]


def _real_feats(net, reference):
    if reference is None:
        return real_features(net)[0]
    return metrics.extract_features(reference, net) if reference.dim() == 4 else reference


def precision_recall_digits(images: torch.Tensor, net=None, reference: torch.Tensor | None = None,
                            k: int = K) -> tuple[float, float]:
    """Precision and recall of `images` `[M, 1, H, W]` in the feature space of `net` (default: the first digits net).

    `reference`: None (all 1,797 real digits), real images `[N, 1, H, W]` or real features `[N, D]` of `net`.
    """
    net = net if net is not None else metrics.load_digits_net()
    return precision_recall(_real_feats(net, reference), metrics.extract_features(images, net), k)


def _per_class_fd_feats(feats, labels, real_feats, real_labels) -> dict[int, float]:
    labels, real_labels = torch.as_tensor(labels).cpu(), torch.as_tensor(real_labels).cpu()
    out = {}
    for c in sorted(int(v) for v in real_labels.unique()):
        fake_c, real_c = feats[labels == c], real_feats[real_labels == c]
        if len(fake_c) < 2 or len(real_c) < 2:
            out[c] = float("nan")   # no covariance from fewer than two samples
            continue
        out[c] = metrics.frechet_distance(*metrics.feature_stats(fake_c), *metrics.feature_stats(real_c))
    return out


def per_class_fd(images: torch.Tensor, labels: torch.Tensor, net=None, reference=None) -> dict[int, float]:
    """FD-digits `{class: fd}` of each class's `images` against the real digits of that class.

    `reference`: None (all 1,797 real digits) or a pair `(real_images, real_labels)`. Every class of the reference
    gets an entry; a class with fewer than two samples gets NaN.
    """
    net = net if net is not None else metrics.load_digits_net()
    if reference is None:
        real_f, real_y = real_features(net)
    else:
        real_f, real_y = metrics.extract_features(reference[0], net), reference[1]
    return _per_class_fd_feats(metrics.extract_features(images, net), labels, real_f, real_y)


# ---------------------------------------------------------------------------------------------------- memorisation

def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Images as float64 rows `[N, 256]`, clamped to [-1, 1] and brought to 16x16 as the feature nets see them."""
    return metrics._prepare(images).double().flatten(1)


def nearest_train_distance(images: torch.Tensor, train_images: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-space L2 distance `[N]` from each image to its nearest training image (default: all 1,797 digits,
    the teacher's training set), at 16x16 in [-1, 1]. Exact, in float64."""
    train = _pixels(train_images if train_images is not None else load_digits(metrics.IMAGE_SIZE)[0])
    x = _pixels(images)
    out = torch.empty(len(x), dtype=torch.float64)
    for start, d in _distances(x, train):
        out[start: start + len(d)] = d.min(1).values
    return out


def copy_threshold(train_images: torch.Tensor | None = None) -> float:
    """The smallest nonzero distance between two training images: a sample closer than this to a training image is
    nearer to it than any other training image is (0.93 for the 1,797 digits, whose typical nearest-neighbour
    distance is about 2.8). Cached per process for the default training set."""
    if train_images is None and _COPY_THRESHOLD:
        return _COPY_THRESHOLD[0]
    train = _pixels(train_images if train_images is not None else load_digits(metrics.IMAGE_SIZE)[0])
    best = math.inf
    for _, d in _distances(train, train):
        nonzero = d[d > 0]
        if len(nonzero):
            best = min(best, nonzero.min().item())
    if train_images is None:
        _COPY_THRESHOLD.append(best)
    return best


def nearest_train_summary(images: torch.Tensor, train_images: torch.Tensor | None = None,
                          threshold: float | None = None) -> dict:
    """Median and 5th percentile of `nearest_train_distance(images)` and `fraction_close`, the fraction of images
    closer than `threshold` (default `copy_threshold(train_images)`) to a training image: what `memorisation`
    compares, and what is cached for a teacher so its samples need not be drawn again."""
    train = train_images if train_images is not None else load_digits(metrics.IMAGE_SIZE)[0]
    threshold = float(threshold) if threshold is not None else copy_threshold(train_images)
    d = nearest_train_distance(images, train).numpy()
    return {"median": float(np.median(d)), "p5": float(np.percentile(d, 5)),
            "fraction_close": float((d < threshold).mean()), "num_samples": len(d), "threshold": threshold}


def compare_memorisation(student: dict, teacher: dict) -> dict:
    """The rule of `memorisation` applied to two `nearest_train_summary` results (same threshold, equal N)."""
    if abs(student["threshold"] - teacher["threshold"]) > 1e-9:
        raise ValueError(f"thresholds differ: student {student['threshold']}, teacher {teacher['threshold']}")
    ratio = student["median"] / teacher["median"] if teacher["median"] > 0 else math.inf
    copies = (student["fraction_close"] > teacher["fraction_close"] + COPY_FRACTION_MARGIN
              or ratio < COPY_MEDIAN_RATIO)
    return {"student": student, "teacher": teacher, "threshold": student["threshold"], "median_ratio": float(ratio),
            "copies": bool(copies), "rule": f"fraction_close(student) > fraction_close(teacher) + "
                                            f"{COPY_FRACTION_MARGIN} or median ratio < {COPY_MEDIAN_RATIO}"}


def memorisation(student_images: torch.Tensor, teacher_images: torch.Tensor,
                 train_images: torch.Tensor | None = None, threshold: float | None = None) -> dict:
    """Does the student copy training images more than its teacher does?

    For the student's and the teacher's samples: the median and 5th percentile of the distance to the nearest
    training image (`nearest_train_distance`; `train_images` default: all 1,797 digits) and `fraction_close`, the
    fraction of samples closer than `threshold` (default `copy_threshold(train_images)`, the smallest distance
    between two distinct training images).

    Rule: `copies` is True when the student's `fraction_close` exceeds the teacher's by more than
    COPY_FRACTION_MARGIN (0.05), or the student's median distance is below COPY_MEDIAN_RATIO (0.75) times the
    teacher's. The first catches exact or near-exact copies of some training images; the second catches a student
    whose samples are, as a whole, pulled towards the training set (copies with noise too large for the threshold).
    The teacher is the reference because it is the distribution the student is meant to match: a teacher that
    memorises itself is reported (its own `fraction_close`) but does not make the student `copies`. Compare the two
    at equal sample counts (the median and 5th percentile shift with N).
    """
    train = train_images if train_images is not None else load_digits(metrics.IMAGE_SIZE)[0]
    threshold = float(threshold) if threshold is not None else copy_threshold(train_images)
    return compare_memorisation(nearest_train_summary(student_images, train, threshold),
                                nearest_train_summary(teacher_images, train, threshold))


# ---------------------------------------------------------------------------------------------------------- report

def quality_report(images: torch.Tensor, labels: torch.Tensor, net_1=None, net_2=None,
                   teacher_images: torch.Tensor | None = None, train_images: torch.Tensor | None = None,
                   k: int = K) -> dict:
    """Everything above for one set of generated `images` `[N, 1, H, W]` (in [-1, 1]) with intended `labels` `[N]`.

    Against all 1,797 real digits: class accuracy, FD-digits, precision and recall in both feature nets (`net_1`
    default `load_digits_net()`, `net_2` default `load_digits_net2()`; keys without a suffix are net 1, `_net2`
    net 2), per-class FD in net 1 (`per_class_fd`, keys are class ints), and, when `teacher_images` are given,
    `memorisation(images, teacher_images, train_images)`. Plain Python numbers throughout (JSON-ready).
    """
    net_1 = net_1 if net_1 is not None else metrics.load_digits_net()
    net_2 = net_2 if net_2 is not None else metrics.load_digits_net2()
    out = {"num_samples": len(images), "k": k}
    for suffix, net in (("", net_1), ("_net2", net_2)):
        (real_f, real_y), fake_f = real_features(net), metrics.extract_features(images, net)
        out[f"accuracy{suffix}"] = metrics.class_accuracy(images, labels, net)
        out[f"fd_digits{suffix}"] = metrics.frechet_distance(*metrics.feature_stats(fake_f),
                                                             *metrics.feature_stats(real_f))
        out[f"precision{suffix}"], out[f"recall{suffix}"] = precision_recall(real_f, fake_f, k)
        if not suffix:
            out["per_class_fd"] = _per_class_fd_feats(fake_f, labels, real_f, real_y)
    if teacher_images is not None:
        out["memorisation"] = memorisation(images, teacher_images, train_images)
    return out
