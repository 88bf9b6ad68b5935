"""fewstep.digits.quality: improved precision / recall, per-class FD, the memorisation check, the second feature
net and the combined report. Reference values are recomputed here by brute force, never hard-coded."""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewstep.digits import metrics, quality
from fewstep.digits.data import load_digits, stratified_split


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(16)
    train_idx, held_idx = stratified_split(y, holdout=0.2, seed=0)
    return x, y, train_idx, held_idx


@pytest.fixture(scope="module")
def net1():
    return metrics.load_digits_net()


@pytest.fixture(scope="module")
def net2():
    return metrics.load_digits_net2()


# ------------------------------------------------------------------------------------------ precision and recall

def _pairwise(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _brute_pr(real, fake, k, include_self=False):
    """Kynkaanniemi et al. 2019 straight from the definition, in numpy."""
    def radii(x):
        d = _pairwise(x, x)
        if not include_self:
            np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]
    precision = (_pairwise(fake, real) <= radii(real)[None]).any(1).mean()
    recall = (_pairwise(real, fake) <= radii(fake)[None]).any(1).mean()
    return precision, recall


@pytest.fixture(scope="module")
def random_feats():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 8))
    fake = 1.3 * rng.standard_normal((250, 8)) + 0.4
    return real, fake


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_brute_force(random_feats, k):
    real, fake = random_feats
    want = _brute_pr(real, fake, k)
    assert 0.05 < want[0] < 0.99 and 0.05 < want[1] < 0.99          # a non-trivial case
    # the data tell the self-excluding radius from one that counts the point itself as its own neighbour
    assert not np.allclose(_brute_pr(real, fake, k, include_self=True), want)
    got = quality.precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=k)
    assert np.allclose(got, quality.precision_recall(real, fake, k=k), atol=1e-6)   # tensors or arrays
    got = quality.precision_recall(real, fake, k=k)
    assert np.allclose(got, want, atol=1e-6), (got, want)
    # the row blocks only bound memory
    assert np.allclose(quality.precision_recall(real, fake, k=k, rows=7), want, atol=1e-6)
    # precision of fake against real is recall of real against fake
    assert np.allclose(quality.precision_recall(fake, real, k=k), want[::-1], atol=1e-6)


def test_knn_radii_exclude_the_point_itself(random_feats):
    real, _ = random_feats
    d = _pairwise(real, real)
    np.fill_diagonal(d, np.inf)
    assert np.allclose(quality.knn_radii(real, k=3, rows=11).numpy(), np.sort(d, 1)[:, 2], atol=1e-12)
    with pytest.raises(ValueError):
        quality.knn_radii(real[:3], k=3)


def test_precision_recall_sanity(random_feats):
    real, _ = random_feats
    assert quality.precision_recall(real, real.copy()) == (1.0, 1.0)
    # a generated set collapsed onto one real point: realistic (precision 1) but covers nothing (recall 1/N)
    collapsed = np.repeat(real[5:6], 200, axis=0)
    p, r = quality.precision_recall(real, collapsed)
    assert p == 1.0 and r == pytest.approx(1 / len(real))
    rng = np.random.default_rng(1)
    p, r = quality.precision_recall(real, collapsed + 1e-3 * rng.standard_normal(collapsed.shape))
    assert p == 1.0 and r < 0.05
    # far-away samples: neither realistic nor covering
    assert quality.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_digits_features_both_nets(digits, net1, net2):
    x, _, train_idx, held_idx = digits
    for net in (net1, net2):
        real = metrics.extract_features(x, net)
        # full size (2000 generated x 1797 real) is cheap: exact distances in row blocks
        fake = real[torch.randint(0, len(real), (2000,), generator=torch.Generator().manual_seed(0))]
        t0 = time.perf_counter()
        p, r = quality.precision_recall(real, fake + 0.05 * torch.randn(fake.shape))
        assert time.perf_counter() - t0 < 30
        assert p > 0.9 and 0.5 < r < 1.0
        # held-out real digits against the train split: high on both; pixel noise: low precision
        p, r = quality.precision_recall_digits(x[held_idx], net, reference=x[train_idx])
        assert p > 0.8 and r > 0.8
        noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        p_noise, _ = quality.precision_recall_digits(noise, net, reference=x[train_idx])
        assert p_noise < 0.1
        # real features as reference give the same answer as real images
        feats = metrics.extract_features(x[train_idx], net)
        assert np.allclose(quality.precision_recall_digits(x[held_idx], net, reference=feats), (p, r), atol=1e-12)


# ------------------------------------------------------------------------------------------------ per-class FD

def test_per_class_fd(digits, net1, net2):
    x, y, train_idx, held_idx = digits
    ref = (x[train_idx], y[train_idx])
    held, held_y = x[held_idx], y[held_idx]
    g = torch.Generator().manual_seed(0)
    shuffled = held.flatten(1)[:, torch.randperm(256, generator=g)].view_as(held)   # pixel-shuffled digits
    results = {}
    for net in (net1, net2):
        real_fd = results[net] = quality.per_class_fd(held, held_y, net, reference=ref)
        noise_fd = quality.per_class_fd(shuffled, held_y, net, reference=ref)
        assert sorted(real_fd) == list(range(10)) and sorted(noise_fd) == list(range(10))
        assert all(np.isfinite(v) for v in real_fd.values()) and all(np.isfinite(v) for v in noise_fd.values())
        assert all(real_fd[c] < noise_fd[c] for c in range(10)), (real_fd, noise_fd)
        # each class is scored against its own class: wrong labels score worse everywhere
        wrong = quality.per_class_fd(held, (held_y + 1) % 10, net, reference=ref)
        assert all(real_fd[c] < wrong[c] for c in range(10))
    # one class by hand, through fd_digits
    c = 3
    direct = metrics.fd_digits(held[held_y == c], net1, reference=x[train_idx][y[train_idx] == c])
    assert results[net1][c] == pytest.approx(direct, rel=1e-9)
    # default reference: all real digits; too few samples -> NaN
    keep = torch.cat([torch.nonzero(held_y != 9).flatten(), torch.nonzero(held_y == 9).flatten()[:1]])
    out = quality.per_class_fd(held[keep], held_y[keep], net1)
    assert sorted(out) == list(range(10)) and np.isnan(out[9]) and all(np.isfinite(out[c]) for c in range(9))


# ------------------------------------------------------------------------------------------------ memorisation

def test_nearest_train_distance_is_a_brute_force_minimum(digits):
    x, _, train_idx, held_idx = digits
    train, held = x[train_idx[:200]], x[held_idx[:50]]
    want = _pairwise(held.flatten(1).double().numpy(), train.flatten(1).double().numpy()).min(1)
    assert np.allclose(quality.nearest_train_distance(held, train).numpy(), want, atol=1e-10)
    assert (quality.nearest_train_distance(train[:20], train) == 0).all()
    d = _pairwise(train.flatten(1).double().numpy(), train.flatten(1).double().numpy())
    assert quality.copy_threshold(train) == pytest.approx(d[d > 0].min(), abs=1e-10)


def _shift(x, dy, dx):
    """Translate by (dy, dx) pixels, filling with the background value -1."""
    return F.pad(x, (1, 1, 1, 1), value=-1.0)[..., 1 - dy: 17 - dy, 1 - dx: 17 - dx]


def test_memorisation_flags_a_student_that_returns_training_images(digits):
    x, _, train_idx, held_idx = digits
    train, teacher = x[train_idx], x[held_idx]        # the teacher stands in for unseen samples of the data
    g = torch.Generator().manual_seed(0)
    picks = train[torch.randperm(len(train), generator=g)[:400]]
    for noise in (0.0, 0.02, 0.1):                    # exact copies, and copies under noise (0.1: above threshold)
        student = (picks + noise * torch.randn(picks.shape, generator=g)).clamp(-1, 1)
        out = quality.memorisation(student, teacher, train)
        assert out["copies"] is True, (noise, out)
        assert out["student"]["median"] < out["teacher"]["median"]
    assert out["threshold"] == pytest.approx(quality.copy_threshold(train))
    exact = quality.memorisation(picks, teacher, train)
    assert exact["student"]["fraction_close"] == 1.0 and exact["student"]["median"] == 0.0
    assert exact["teacher"]["fraction_close"] < 0.05
    # half of the samples copied is still flagged
    half = torch.cat([picks[:180], teacher[:180]])
    assert quality.memorisation(half, teacher, train)["copies"] is True


def test_memorisation_does_not_flag_samples_from_the_data_distribution(digits):
    x, _, train_idx, held_idx = digits
    train, held = x[train_idx], x[held_idx]
    a, b = held[::2], held[1::2]                       # two disjoint sets of unseen real digits
    out = quality.memorisation(a, b, train)
    assert out["copies"] is False, out
    assert set(out) >= {"student", "teacher", "threshold", "copies", "median_ratio"}
    assert set(out["student"]) >= {"median", "p5", "fraction_close"}
    assert out["student"]["fraction_close"] < 0.05
    # training images moved by one pixel are new images, not copies
    g = torch.Generator().manual_seed(1)
    moved = _shift(train[torch.randperm(len(train), generator=g)[:400]], 1, 1)
    assert quality.memorisation(moved, held, train)["copies"] is False
    # the rule is relative to the teacher: a teacher that copies as much as the student does not flag it
    copies = train[:300]
    assert quality.memorisation(copies, train[300:600], train)["copies"] is False


# ---------------------------------------------------------------------------------------------- second feature net

def test_second_net_is_a_different_independently_trained_net(digits, net1, net2):
    x, y, _, _ = digits
    assert isinstance(net2, metrics.DigitsNet2) and not isinstance(net2, metrics.DigitsNet) and not net2.training
    shapes1 = {k: tuple(v.shape) for k, v in net1.state_dict().items()}
    shapes2 = {k: tuple(v.shape) for k, v in net2.state_dict().items()}
    assert shapes1 != shapes2 and len(net2.convs) != len(net1.convs)
    f1, f2 = metrics.extract_features(x[:10], net1), metrics.extract_features(x[:10], net2)
    assert f1.shape[1] != f2.shape[1]
    cfg = json.loads((metrics.DIGITS_NET2_DIR / "config.json").read_text())
    seed = cfg["training"]["seed"]
    assert seed != 0                                   # digits_net was trained with seed 0
    # held-out accuracy on the split it did not train on
    _, held_idx = stratified_split(y, holdout=cfg["training"]["holdout"], seed=seed)
    acc = metrics.class_accuracy(x[held_idx], y[held_idx], net2)
    assert acc >= 0.95
    assert acc == pytest.approx(cfg["training"]["held_out_accuracy"], abs=1e-4)
    card = (metrics.DIGITS_NET2_DIR / "README.md").read_text()
    assert "train/classifier2.py" in card and f"{acc:.4f}" in card and "Wall time" in card
    # it plugs into the existing FD-digits functions
    assert abs(metrics.fd_digits(x, net2)) < 1e-6
    assert metrics.fd_digits(x[held_idx], net2) > 0


# ---------------------------------------------------------------------------------------------------- the report

def test_quality_report(digits, net1, net2):
    x, y, train_idx, held_idx = digits
    images, labels = x[held_idx], y[held_idx]
    rep = quality.quality_report(images, labels, net1, net2, teacher_images=x[held_idx].flip(0),
                                 train_images=x[train_idx])
    json.dumps(rep)                                    # JSON-ready
    for key in ("accuracy", "fd_digits", "precision", "recall"):
        assert isinstance(rep[key], float) and isinstance(rep[key + "_net2"], float)
    assert rep["accuracy"] == pytest.approx(metrics.class_accuracy(images, labels, net1))
    assert rep["accuracy_net2"] == pytest.approx(metrics.class_accuracy(images, labels, net2))
    assert rep["fd_digits"] == pytest.approx(metrics.fd_digits(images, net1), rel=1e-9)
    assert rep["fd_digits_net2"] == pytest.approx(metrics.fd_digits(images, net2), rel=1e-9)
    assert (rep["precision_net2"], rep["recall_net2"]) == pytest.approx(
        quality.precision_recall_digits(images, net2), abs=1e-12)
    assert rep["per_class_fd"] == pytest.approx(quality.per_class_fd(images, labels, net1), rel=1e-9)
    assert rep["memorisation"]["copies"] is False and rep["num_samples"] == len(held_idx)
    assert "memorisation" not in quality.quality_report(images[:50], labels[:50], net1, net2)


def test_score_with_quality_equals_every_piece_computed_afresh(tiny_teacher_dir, digits, net1, net2):
    """`scoring.score(quality=True)` takes net 1's accuracy and FD-digits from the quality report and the real digits'
    features from the per-process cache: every figure equals the pieces computed afresh (real features extracted
    again, accuracy and FD-digits by `metrics`), exactly."""
    from fewstep.digits import scoring

    pipe, n, seeds = scoring.load_pipeline(tiny_teacher_dir), 30, (0, 1)
    out = scoring.score(pipe, n, seeds, steps=2, guidance_scale=1.5, quality=True)
    real_x, real_y = digits[0], digits[1]
    per_seed = []
    for s in seeds:
        x, y = scoring.generate(pipe, n, s, 2, 1.5)
        row = {"accuracy": metrics.class_accuracy(x, y, net1), "fd_digits": metrics.fd_digits(x, net1), "x": x}
        for suffix, net in (("", net1), ("_net2", net2)):
            real_f, fake_f = metrics.extract_features(real_x, net), metrics.extract_features(x, net)
            row[f"accuracy{suffix}"] = metrics.class_accuracy(x, y, net)
            row[f"fd_digits{suffix}"] = metrics.frechet_distance(*metrics.feature_stats(fake_f),
                                                                 *metrics.feature_stats(real_f))
            row[f"precision{suffix}"], row[f"recall{suffix}"] = quality.precision_recall(real_f, fake_f)
            if not suffix:
                row["per_class_fd"] = quality._per_class_fd_feats(fake_f, y, real_f, real_y)
        per_seed.append(row)
    assert out["fd_digits_per_seed"] == [r["fd_digits"] for r in per_seed]
    assert out["fd_digits"] == float(np.mean(out["fd_digits_per_seed"]))
    for key in ("accuracy", "accuracy_net2", "fd_digits_net2", "precision", "recall", "precision_net2", "recall_net2"):
        vals = [r[key] for r in per_seed]
        assert (out[key], out[f"{key}_std"]) == (float(np.mean(vals)), float(np.std(vals))), key
    assert out["per_class_fd"] == {c: float(np.mean([r["per_class_fd"][c] for r in per_seed])) for c in range(10)}
    assert out["nearest_train"] == quality.nearest_train_summary(per_seed[0]["x"], real_x.clone())
    # the plain path (quality=False) gives the same accuracy and FD-digits
    plain = scoring.score(pipe, n, seeds, steps=2, guidance_scale=1.5)
    assert (plain["accuracy"], plain["fd_digits_per_seed"]) == (out["accuracy"], out["fd_digits_per_seed"])


def test_real_features_are_cached_per_net_weights(digits, net1):
    x = digits[0]
    feats, labels = quality.real_features(net1)
    assert torch.equal(feats, metrics.extract_features(x, net1)) and torch.equal(labels, digits[1])
    assert quality.real_features(metrics.load_digits_net())[0] is feats           # the same weights: a cache hit
    other = metrics.load_digits_net()
    with torch.no_grad():
        other.fc.weight.mul_(1.01)
    assert torch.equal(quality.real_features(other)[0], metrics.extract_features(x, other))
    assert not torch.equal(quality.real_features(other)[0], feats)                # new weights: extracted anew
    assert quality.copy_threshold() == quality.copy_threshold() == quality.copy_threshold(x.clone())
