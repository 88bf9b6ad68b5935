"""FewStepRouter: several students of one diffusers class behind one component, each sample run on the student
that owns its condition.

Multi-Student Distillation (Song et al., arXiv 2410.23274) partitions the condition set into K subsets and distils
one student per subset; at inference a request runs on the student of its subset, at one student's cost. This
model takes the place of a pipeline's backbone (``unet`` or ``transformer``) and splits every call by sample:

- class labels (``class_labels``): student ``class_owner[label]``; a label past the table (the null label of
  classifier-free guidance) runs on student 0;
- text (``encoder_hidden_states`` ``[B, L, D]``): the nearest (squared Euclidean distance) of the K rows of
  ``centroids`` to the prompt embedding averaged over its tokens, computed in float32.

Every per-sample input (a tensor, or a dict of tensors, whose first dimension is the batch) is split the same way
and the students' outputs are put back in the batch's order; a batch that one student owns whole runs in one call.
The students were distilled for ``guidance_scale=1``: with classifier-free guidance a pipeline's unconditional half
is routed by its own (null or empty-prompt) condition.
Reading ``config`` gives the first student's config (what pipelines look up: ``in_channels``, ``sample_size``, ...)
overlaid with this model's own keys, and attributes it lacks are read from the first student.

This file imports only torch and diffusers so that it can be copied alone into an exported pipeline folder
(``<component>/router_fewstep.py``) and loaded with ``trust_remote_code=True``.
"""

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.modeling_utils import ModelMixin


def nearest(features, centroids):
    """Index of the nearest centroid of each feature row (ties: the lower index)."""
    return ((features[:, None, :] - centroids[None].to(features)) ** 2).sum(-1).argmin(1)


def _take(value, idx, batch: int):
    """``value`` restricted to the samples ``idx``: tensors with the batch as first dimension, and dicts of them."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == batch:
        return value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: _take(v, idx, batch) for k, v in value.items()}
    return value


class FewStepRouter(ModelMixin, ConfigMixin):
    """``num_students`` models of class ``student_class`` (each built from ``student_config``), chosen per sample by
    its class label (``class_owner``) or its prompt embedding (``route_dim`` > 0: the ``centroids`` buffer)."""

    @register_to_config
    def __init__(self, student_class: str = "UNet2DModel", student_config: dict | None = None, num_students: int = 1,
                 class_owner: list | None = None, route_dim: int = 0):
        super().__init__()
        model_cls = getattr(diffusers, student_class, None)
        if model_cls is None:
            raise ValueError(f"student_class={student_class!r} is not a diffusers model class")
        owners = [int(k) for k in class_owner or []]
        if any(not 0 <= k < num_students for k in owners):
            raise ValueError(f"class_owner={class_owner} names a student outside 0..{num_students - 1}")
        if num_students > 1 and not owners and route_dim <= 0:
            raise ValueError("several students need a routing rule: class_owner (class labels) or route_dim > 0 "
                             "(nearest prompt-embedding centroid)")
        config = {k: v for k, v in dict(student_config or {}).items() if not k.startswith("_")}
        self.students = torch.nn.ModuleList([model_cls.from_config(config) for _ in range(num_students)])
        self.register_buffer("owner_table", torch.tensor(owners, dtype=torch.long), persistent=False)
        if route_dim > 0:
            self.register_buffer("centroids", torch.zeros(num_students, route_dim))

    @classmethod
    def of(cls, models, class_owner=None, centroids=None) -> "FewStepRouter":
        """A router over ``models`` (one diffusers class), their weights copied in; ``class_owner`` (a list) or
        ``centroids`` (a ``[K, D]`` tensor) is the routing rule."""
        config = {k: v for k, v in dict(models[0].config).items() if not k.startswith("_")}    # no _name_or_path
        router = cls(student_class=type(models[0]).__name__, student_config=config,
                     num_students=len(models), class_owner=class_owner,
                     route_dim=0 if centroids is None else int(centroids.shape[1]))
        for dst, src in zip(router.students, models):
            dst.load_state_dict(src.state_dict())
        if centroids is not None:
            router.centroids.copy_(centroids.detach().float().cpu())
        return router.eval()

    @property
    def config(self) -> FrozenDict:
        # pipelines read backbone fields (in_channels, sample_size, guidance_embeds, ...) from config
        return FrozenDict({**self.students[0].config, **self._internal_dict})

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            students = self.__dict__.get("_modules", {}).get("students")
            if students is None or name.startswith("_"):
                raise
            return getattr(students[0], name)     # e.g. SDXL's unet.add_embedding

    def owners(self, class_labels=None, encoder_hidden_states=None, batch: int = 1):
        """``[B]`` long: the student of each sample."""
        if len(self.students) == 1:
            return torch.zeros(batch, dtype=torch.long)
        if len(self.owner_table):
            if class_labels is None:
                raise ValueError("this router sends samples by class label: pass class_labels")
            labels = torch.as_tensor(class_labels).long().reshape(-1).cpu()
            table = self.owner_table.cpu()
            return torch.where(labels < len(table), table[labels.clamp(0, len(table) - 1)], 0)
        if encoder_hidden_states is None:
            raise ValueError("this router sends samples by prompt embedding: pass encoder_hidden_states")
        return nearest(encoder_hidden_states.float().mean(1), self.centroids).cpu()

    def forward(self, *args, **kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else kwargs.get("hidden_states", args[0] if args else None)
        key = {"class_labels": None, "encoder_hidden_states": None}
        for name in key:     # by keyword, else the third positional argument (UNet2DModel / UNet2DConditionModel)
            key[name] = kwargs.get(name)
        if key["class_labels"] is None and key["encoder_hidden_states"] is None and len(args) > 2:
            key["class_labels" if len(self.owner_table) else "encoder_hidden_states"] = args[2]
        owner = self.owners(**key, batch=len(sample))
        first = int(owner[0])
        if bool((owner == first).all()):
            return self.students[first](*args, **kwargs)
        batch, result, out = len(owner), None, None
        for k in owner.unique().tolist():
            idx = (owner == k).nonzero().flatten()
            out = self.students[k](*[_take(a, idx, batch) for a in args],
                                   **{n: _take(v, idx, batch) for n, v in kwargs.items()})
            part = out[0]
            if result is None:
                result = part.new_empty((batch, *part.shape[1:]))
            result[idx.to(part.device)] = part
        return type(out)(sample=result) if kwargs.get("return_dict", True) else (result,)
