"""The bundled digits assets: data loader, FD-digits maths, committed classifier and teacher."""

import numpy as np
import scipy.linalg
import torch
from sklearn.datasets import load_digits as sk_load_digits

from fewstep.digits.data import NULL_CLASS, NUM_CLASSES, load_digits, random_shift
from fewstep.digits.metrics import (
    DigitsNet,
    class_accuracy,
    extract_features,
    fd_digits,
    feature_stats,
    frechet_distance,
    load_digits_net,
)
from fewstep.digits.teacher import TEACHER_DIR

torch.set_num_threads(1)


def test_load_digits_shapes_range_labels():
    x0, labels = load_digits(16)
    assert x0.shape == (1797, 1, 16, 16) and x0.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert x0.min() >= -1.0 and x0.max() <= 1.0 and x0.min() < -0.99 and x0.max() > 0.99
    assert set(labels.tolist()) == set(range(NUM_CLASSES)) and NULL_CLASS == NUM_CLASSES
    x8, _ = load_digits(8)
    assert torch.equal(x8[:, 0], torch.from_numpy(sk_load_digits().images).float() / 8 - 1)
    assert torch.equal(load_digits(16)[0], x0)  # deterministic


def test_random_shift_moves_content_without_wrapping():
    x = -torch.ones(2, 1, 6, 6)
    x[:, :, 0, 0] = 1.0  # a bright corner pixel can only move inward or be dropped, never wrap
    y = random_shift(x, 1, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and (y[:, :, -1, :] == -1).all() and (y[:, :, :, -1] == -1).all()
    assert torch.equal(random_shift(x, 0), x)


def _direct_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) + 0.5
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    assert np.allclose(mu1, a.mean(0)) and np.allclose(s1, np.cov(a, rowvar=False))
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isclose(fd, _direct_fd(mu1, s1, mu2, s2), rtol=1e-10)
    assert np.isclose(fd, frechet_distance(mu2, s2, mu1, s1), rtol=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # two Gaussians with equal covariance: only the mean term remains
    assert np.isclose(frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3)), 3.0)


def test_committed_digits_net_classifies_real_digits():
    net = load_digits_net()
    x0, labels = load_digits(16)
    assert isinstance(net, DigitsNet) and not net.training
    assert net(x0[:4]).shape == (4, NUM_CLASSES)
    feats = extract_features(x0[:10], net)
    assert feats.shape[0] == 10 and feats.shape[1] <= 64
    assert class_accuracy(x0, labels, net) > 0.95
    assert abs(fd_digits(x0, net)) < 1e-6  # the real digits against themselves


def test_committed_teacher_loads_with_plain_diffusers():
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(TEACHER_DIR / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(TEACHER_DIR / "scheduler")
    assert unet.config.num_class_embeds == NUM_CLASSES + 1 and unet.config.sample_size == 16
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing" and not scheduler.config.clip_sample
    x_t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = unet(x_t, torch.tensor([999, 500, 1]), class_labels=torch.tensor([0, 7, NULL_CLASS])).sample
    assert v.shape == (3, 1, 16, 16) and torch.isfinite(v).all()


def test_bundled_teacher_is_a_loadable_pipeline_with_current_code(tmp_path, monkeypatch):
    """The teacher folder carries a copy of pipelines/pipeline_fewstep.py; it must not drift from the source."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    root = Path(__file__).resolve().parents[1]
    teacher = root / "fewstep" / "assets" / "digits_teacher"
    assert (teacher / "pipeline_fewstep.py").read_text() == (root / "pipelines" / "pipeline_fewstep.py").read_text()
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    pipe = DiffusionPipeline.from_pretrained(teacher, trust_remote_code=True)
    assert type(pipe).__name__ == "FewStepClassPipeline"
    import torch

    x = pipe([3], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
             output_type="pt").images
    assert x.shape == (1, 1, 16, 16)
