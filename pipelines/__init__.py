"""fewstep_pipelines: inference-only code for few-step students (imports torch/numpy/diffusers, never fewstep).

Each of `scheduling_fewstep.py` and `pipeline_fewstep.py` is self-contained so that `export.py` can copy
it alone into an exported diffusers directory as a custom component.
"""

from .export import (
    class_pipeline_from_unet,
    fewstep_scheduler_for,
    save_lora,
    save_pipeline_dir,
    save_student_pipeline,
    student_scheduler_for,
)
from .pipeline_fewstep import FewStepClassPipeline
from .scheduling_fewstep import FewStepScheduler

__all__ = [
    "FewStepClassPipeline",
    "FewStepScheduler",
    "class_pipeline_from_unet",
    "fewstep_scheduler_for",
    "save_lora",
    "save_pipeline_dir",
    "save_student_pipeline",
    "student_scheduler_for",
]
