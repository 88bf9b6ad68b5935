"""fewstep: distill many-step diffusion and flow-matching models into one- and few-step generators."""
from .conditioning import Batch, Cond
from .denoiser import Denoiser
from .generator import FewStepGenerator
from .schedules import NoiseSchedule, RectifiedFlow, TrigFlow, VPDiscrete, from_diffusers

__version__ = "0.1.0"
__all__ = ["Batch", "Cond", "Denoiser", "FewStepGenerator", "NoiseSchedule", "RectifiedFlow", "TrigFlow",
           "VPDiscrete", "from_diffusers"]
