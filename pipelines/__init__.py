"""fewstep_pipelines: the inference-only files copied into exported diffusers folders.

Each of ``scheduling_fewstep.py`` and ``pipeline_fewstep.py`` imports only torch, numpy and diffusers (never
fewstep), so an exported folder loads with ``trust_remote_code=True`` in a Python without fewstep.
"""

from .pipeline_fewstep import FewStepClassPipeline
from .scheduling_fewstep import FewStepScheduler

__all__ = ["FewStepClassPipeline", "FewStepScheduler"]
