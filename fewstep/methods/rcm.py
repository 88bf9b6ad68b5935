"""rCM: score-regularized continuous-time consistency (Zheng et al., "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", ICLR 2026, arXiv 2510.08431).

The student loss is sCM's continuous-time consistency loss (``fewstep.methods.scm``, forward divergence, mode
covering) plus DMD's reverse-divergence distribution-matching term as a "long-skip" regulariser (mode seeking),

    L_student = L_sCM + lambda L_DMD,

with DMD2's fake score (critic) trained by denoising on detached student samples, the two time-scale update
(critic every step, student every ``student_every``) and backward simulation over the student's t-list: the DMD2
objective and critic turn of ``fewstep.methods.dmd2`` reused as they are (this class is a DMD2 whose student loss
adds the sCM term). The sCM term trains on noised real data along the teacher's PF-ODE; the DMD term on the
student's own samples: two generation paths that the paper says do not conflict.

Facts used, and where from. The abstract (arXiv listing, stored) gives the method: sCM plus score distillation as
a long-skip regulariser, "without GAN tuning". The weight: the paper's relative weight 0.01 for DMD with both terms
summed over dimensions (the official code writes it as sCM x 100, DMD x 1), per the authors in NVlabs/rcm issue #8;
both of fewstep's terms are means over dimensions (sCM's ``e^w / D ||.||^2``, DMD2's ``0.5 mean(.)``), so the same
ratio is ``dmd_weight = 0.01``. TTUR 5, teacher guidance 5, tangent warm-up 1000 steps, fake-score lr 4e-7 beside the
student's 2e-6: the Wan2.1 1.3B config, per ``../shared/reference/sid_fdistill_consistency.md`` section 2.12. No
schedule of lambda was found (the paper and issue give a constant): lambda is constant here. The DMD time density
(the official ``UniformShift(5)``) is not reproduced: DMD2's ``U[t_min, t_max]`` is used.

Config fields -> paper symbols: those of ``SCMConfig`` (sCM) and ``DMD2Config`` (the DMD term and critic;
``guidance_scale`` is one teacher CFG w for both terms), and ``dmd_weight`` = lambda (0 = sCM exactly, with an
idle critic turn). Full mode only (as sCM).
"""
from __future__ import annotations

from dataclasses import dataclass

from fewstep.core.conditioning import Batch
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.methods.base import require
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.methods.scm import SCMConfig, SCMObjective, check_scm_config


@dataclass
class RCMConfig(SCMConfig, DMD2Config):
    """rCM hyperparameters: sCM's, DMD2's and the DMD weight lambda (see the module docstring)."""

    dmd_weight: float = 0.01


class RCM(DMD2):
    """DMD2's critic and student turns, the student loss sCM's plus ``dmd_weight`` times DMD2's."""

    name = "rcm"
    Config = RCMConfig

    @classmethod
    def validate(cls, cfg: RCMConfig, model, data) -> None:
        require(cfg.dmd_weight >= 0, f"method.dmd_weight {cfg.dmd_weight} must be >= 0 (the DMD term's weight "
                "lambda; 0 = sCM alone)")
        check_scm_config(cfg, model, data, "rCM")
        super().validate(cfg, model, data)

    def __init__(self, cfg: RCMConfig, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser, head=None):
        super().__init__(cfg, teacher, student, critic, head)
        self.scm = SCMObjective(cfg, self.teacher, self.student)

    def trainable(self):
        params = super().trainable()
        return {**params, "student": params["student"] + list(self.scm.weight.parameters())}

    def checkpoint_modules(self):
        return {**super().checkpoint_modules(), "weight": self.scm.weight}

    def student_loss(self, batch: Batch, step: int):
        """``L_sCM + lambda L_DMD`` (lambda = 0 skips the DMD term: the loss is sCM's, bit for bit)."""
        loss, logs = self.scm(batch, step)
        if self.cfg.dmd_weight == 0:
            return loss, logs
        dmd, dmd_logs = super().student_loss(batch, step)
        total = loss + self.cfg.dmd_weight * dmd
        return total, {**logs, **dmd_logs, "loss/student/rcm": total.detach()}
