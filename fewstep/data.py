"""Batch sources. A source builds the micro-batch of (step, turn, micro, rank) deterministically from
per-sample seeds, so the data position of a run is its step and resume needs no iterator state."""
from __future__ import annotations

import torch

from .conditioning import Batch, Cond, sample_seed


class ClassLabelSource:
    """Class-conditional pixel data: uniform labels, unit noise, and real samples for GAN terms.

    Sample ``j`` of a step's global batch uses the seed of (seed, step, turn, j), where
    ``j = (micro * world + rank) * batch_size + b``: 4 micro-batches of 1 equal 1 of 4, and 2 processes
    at batch B equal 1 process at batch 2B.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, null_class: int,
                 batch_size: int, seed: int = 0):
        self.images, self.labels = images, labels
        self.num_classes, self.null_class = num_classes, null_class
        self.batch_size, self.seed = batch_size, seed

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, step: int, turn: int, micro: int = 0, rank: int = 0, world: int = 1) -> Batch:
        B = self.batch_size
        first = (micro * world + rank) * B
        seeds = torch.tensor([sample_seed(self.seed, step, turn, first + b) for b in range(B)], dtype=torch.long)
        labels, noise, real_idx = [], [], []
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(s)
            labels.append(int(torch.randint(self.num_classes, (1,), generator=g)))
            noise.append(torch.randn(self.sample_shape, generator=g))
            real_idx.append(int(torch.randint(len(self.images), (1,), generator=g)))
        labels_t = torch.tensor(labels)
        real = torch.tensor(real_idx)
        return Batch(noise=torch.stack(noise), cond=Cond(labels=labels_t),
                     uncond=Cond(labels=torch.full_like(labels_t, self.null_class)),
                     x0_real=self.images[real], cond_real=Cond(labels=self.labels[real]), seeds=seeds)


def digits_source(batch_size: int, seed: int = 0, size: int = 16) -> ClassLabelSource:
    """The bundled digits (scikit-learn, 1,797 images) as a class-label source."""
    from .digits import NULL_CLASS, NUM_CLASSES, load_digits

    images, labels = load_digits(size)
    return ClassLabelSource(images, labels, NUM_CLASSES, NULL_CLASS, batch_size, seed)
