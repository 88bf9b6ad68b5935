"""fewstep: distill many-step diffusion and flow-matching models into one- and few-step generators."""
from fewstep import backbones  # noqa: F401  (registers the diffusers adapters: FewStepGenerator.from_pretrained)
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import NoiseSchedule, RectifiedFlow, TrigFlow, VPDiscrete, from_diffusers

__version__ = "0.1.0"
__all__ = ["Batch", "Cond", "Denoiser", "FewStepGenerator", "NoiseSchedule", "RectifiedFlow", "TrigFlow",
           "VPDiscrete", "from_diffusers"]
