"""Adapter for ``fewstep.testing.toy.ToyGMMModel``: the exact Gaussian-mixture teacher of the tests."""
from __future__ import annotations

from fewstep.backbones.base import DiffusersAdapter
from fewstep.core.conditioning import Cond


class ToyAdapter(DiffusersAdapter):
    """``ToyGMMModel(x_t, timestep, class_labels=...)``; its hidden ``mid`` activations are tapped."""

    feature_modules = ("mid",)

    def forward(self, x_t, timestep, cond: Cond):
        return self.model(x_t, timestep.to(x_t.device), class_labels=cond.labels, return_dict=False)[0]

    def feature_channels(self) -> int:
        return self.model.config.hidden
