"""DisBack: Distribution Backtracking distillation (Zhang et al., "Distribution Backtracking Builds A Faster
Convergence Trajectory for Diffusion Distillation", ICLR 2025, arXiv 2408.15991), as a delta over DMD2
(arXiv 2405.14867, ``dmd2.py``).

Score distillation pulls the initial student G_0 straight at the teacher's score s_theta, which fits G_0's samples
badly early on (the paper's "score mismatch"). DisBack distils along a path of intermediate scores instead:

- stage 1, degradation recording: an auxiliary score s', initialised from the teacher, is trained by denoising
  score matching on samples of G_0, which is held fixed (DMD2's critic objective with s' in the critic's place,
  without the GAN term). Every ``snapshot_every`` steps its state is recorded: s'_0 = s_theta (nothing stored),
  s'_1, ..., s'_N, the last close to the score of G_0's distribution; N = ``record_steps / snapshot_every``;
- stage 2, distribution backtracking: the path reversed is the convergence trajectory. The fake score F (DMD2's
  critic) starts from s'_N; G is trained with DMD2's distribution-matching gradient (DMD eq. 7-8, ``losses.dmd``:
  ``g = (x0_fake - x0_real) / mean|x - x0_real|``) with the real score ``x0_real`` taken from the current node
  s'_i (with the same CFG as the teacher's). i starts at N - 1 and moves one node toward the teacher every
  ``interval`` student updates, ending at s'_0 = the teacher, the target for the rest of the run. F trains on G's
  samples as in DMD2 (denoising and the optional GAN term).

The path in fewstep: s' is a LoRA adapter ("path") on the teacher's frozen backbone in both modes, so a node is the
adapter's weights, a low-rank delta on the shared base (``DegradationPath``), and s'_i runs as the teacher's own
backbone with node i loaded: one backbone in memory however long the path. Why a LoRA: a full-parameter s' can
only be kept as full copies or approximated by truncated SVDs, while an adapter is stored exactly and small; and
fitting G_0's distribution is a short move from the teacher, within an adapter's reach (LoRA fake scores suffice
in DMD2's LoRA and SwiftBrush's recipes). F is the run's critic: in ``lora`` mode an adapter of the same shape,
given s'_N's weights; in ``full`` mode a full copy, given the teacher's weights with s'_N's delta merged in. The
nodes cost N x the adapter's size, on the model's device and in every checkpoint (digits_disback: 4 x 0.26 MB;
sdxl_disback: 25 x 93 MB); FSDP, which shards the adapter, is not supported.

The stages are steps of one run. A turn ``record`` with its own optimizer (``optim.record``: an adapter wants
another learning rate than a full critic) trains s' on steps 0 .. record_steps - 1; DMD2's critic and student turns
start at ``record_steps`` (``Turn.start`` / ``Turn.stop``); nodes are recorded and F initialised in ``after_step``;
the target node is a function of the step; the nodes are part of the checkpoint (``checkpoint_modules()["path"]``).
So a killed run resumes in either stage. With ``record_steps = 0`` the path is the teacher alone and the method is
DMD2 bit for bit. A run must be long enough for the target to reach the teacher (checked when it is built).

Config fields -> paper symbols: ``record_steps`` = the iterations of stage 1, degradation recording (0: no path,
DMD2); ``snapshot_every`` = the recording interval, N = record_steps / snapshot_every nodes; ``interval`` = the
student updates spent on each node in stage 2.

The other fields are DMD2's (see ``dmd2.py``; the real score's CFG scale applies to the node as to the teacher). The
adapter's rank is ``model.lora_rank``, its optimizer ``optim.record`` (presets set it beside ``optim.student`` and
``optim.critic``).

Sources: the two stages, s' initialised from the teacher and fitted to G_0's distribution, the nodes
{s'_i | i = 0..N} and their reversed use are the paper's (abstract; Fig. 3). F initialised from s'_N, the target
starting at s'_{N-1} and moving one node per fixed number of iterations, and the SDXL recipe come from reference
notes on the official code, from which nothing here is taken.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.core import losses, timesteps
from fewstep.core.conditioning import Batch
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.parameterization import from_x0
from fewstep.methods.base import Parts, Turn, require
from fewstep.methods.dmd2 import DMD2, DMD2Config


@dataclass
class DisBackConfig(DMD2Config):
    """DMD2 hyperparameters plus the path's (see the module docstring)."""

    record_steps: int = 200
    snapshot_every: int = 50
    interval: int = 20


class DegradationPath(nn.Module):
    """The nodes s'_1..s'_N as flat float32 copies of the path adapter's weights (s'_0 is the teacher: nothing is
    stored), and the adapter's live weights (the same tensors, registered here too), so a checkpoint holds both."""

    def __init__(self, params: list[nn.Parameter], nodes: int):
        super().__init__()
        self.live = nn.ParameterList(params)
        self.register_buffer("nodes", torch.zeros(nodes, sum(p.numel() for p in params)))
        self.loaded = 0      # the node the live weights hold in stage 2; 0: none (the state after a resume)

    @property
    def N(self) -> int:
        return len(self.nodes)

    @torch.no_grad()
    def record(self, i: int) -> None:
        """Store the live weights as node ``i`` (1..N)."""
        require(not any(hasattr(p, "full_tensor") for p in self.live), "DisBack's path nodes are whole copies of "
                "the adapter, which FSDP shards: run it without FSDP (the default or the DDP accelerate config)")
        self.nodes[i - 1] = torch.cat([p.detach().reshape(-1).float() for p in self.live])

    @torch.no_grad()
    def load(self, i: int, params=None) -> None:
        """Write node ``i`` into ``params`` (default: the live adapter), which must have the adapter's shapes."""
        params = list(self.live if params is None else params)
        require([p.shape for p in params] == [p.shape for p in self.live],
                "the path adapter and the critic adapter differ in shape; both must use model.lora_rank")
        for p, chunk in zip(params, self.nodes[i - 1].split([p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


class DisBack(DMD2):
    """DMD2's turns with a recording stage before the student's first update and a walking real score after."""

    name = "disback"
    Config = DisBackConfig

    def __init__(self, cfg: DisBackConfig, teacher: Denoiser, student: FewStepGenerator, critic: Denoiser,
                 aux: Denoiser | None, total_steps: int, head: nn.Module | None = None):
        super().__init__(cfg, teacher, student, critic, head)
        N = cfg.record_steps // cfg.snapshot_every
        require(N == 0 or aux is not None, "method.record_steps > 0 needs the path adapter (Parts.adapter)")
        first = cfg.record_steps + (N - 1) * cfg.interval * cfg.student_every
        require(N == 0 or first < total_steps, f"train.max_steps {total_steps}: the target reaches the teacher only "
                f"at step {first} (method.record_steps {cfg.record_steps}, then {N - 1} nodes x method.interval "
                f"{cfg.interval} student updates x method.student_every {cfg.student_every}); raise train.max_steps "
                "above it, or shorten the path (method.record_steps, method.snapshot_every, method.interval)")
        self.aux = aux if N else None
        self.path = DegradationPath(aux.trainable_parameters(), N) if N else None
        R = cfg.record_steps      # DMD2's turns keep their indices (the batches they draw); stage 1's comes last
        self.turns = (Turn("critic", start=R), Turn("student", every=cfg.student_every, start=R)) + \
            ((Turn("record", stop=R),) if N else ())

    @classmethod
    def build(cls, cfg: DisBackConfig, parts: Parts) -> DisBack:
        """DMD2's networks (in DMD2's order: the same draws initialise them) and then the path adapter."""
        critic = parts.critic()
        student, head = parts.student(), parts.head(critic)
        aux = parts.adapter("path") if cfg.record_steps else None
        return cls(cfg, parts.teacher, student, critic, aux, parts.total_steps, head)

    @classmethod
    def validate(cls, cfg: DisBackConfig, model, data) -> None:
        super().validate(cfg, model, data)
        require(cfg.snapshot_every >= 1 and cfg.interval >= 1, f"method.snapshot_every {cfg.snapshot_every} and "
                f"method.interval {cfg.interval} must be at least 1")
        require(cfg.record_steps >= 0 and cfg.record_steps % cfg.snapshot_every == 0,
                f"method.record_steps {cfg.record_steps} must be a multiple of method.snapshot_every "
                f"{cfg.snapshot_every} (>= 0; 0 = no path: DMD2), so that the last node is where F starts")
        require(cfg.gan_features == "critic", "method.gan_features teacher: the real score walks the path, so a "
                "head on the teacher's features would read a different network each node; use critic")

    @property
    def N(self) -> int:
        return self.path.N if self.path is not None else 0

    def trainable(self):
        params = super().trainable()
        if self.aux is not None:
            params["record"] = self.aux.trainable_parameters()
        return params

    def checkpoint_modules(self):
        mods = super().checkpoint_modules()
        if self.path is not None:
            mods["path"] = self.path
        return mods

    def node(self, step: int) -> int:
        """The node the student is distilled from at ``step``: N - 1 for the first ``interval`` student updates of
        stage 2, then one nearer the teacher (0) every ``interval`` updates."""
        c = self.cfg
        k = max(step - c.record_steps, 0) // c.student_every
        return max(self.N - 1 - k // c.interval, 0)

    @contextmanager
    def target(self, i: int):
        """The teacher's denoiser runs as node s'_i inside the block: its backbone with the path adapter holding
        node i (i = 0: the teacher itself)."""
        if i == 0:
            yield
            return
        if self.path.loaded != i:
            self.path.load(i)
            self.path.loaded = i
        saved, self.teacher.adapter = self.teacher.adapter, self.aux.adapter
        try:
            yield
        finally:
            self.teacher.adapter = saved

    def student_loss(self, batch: Batch, step: int):
        """DMD2's student objective with the real score of node ``node(step)``."""
        i = self.node(step)
        with self.target(i):
            loss, logs = super().student_loss(batch, step)
        return loss, {**logs, "path/target_node": torch.tensor(float(i))}

    def forward(self, turn: str, batch: Batch, step: int):
        return self.record_loss(batch, step) if turn == "record" else super().forward(turn, batch, step)

    def record_loss(self, batch: Batch, step: int):
        """Stage 1: s' denoises samples of the fixed G_0 over the critic's time range."""
        c = self.cfg
        with torch.no_grad():
            x = self.generate(batch, step)[0]
        x_t, t = timesteps.noised(self.teacher.schedule, x, batch, 3, c.critic_t_min, c.critic_t_max)
        kind = self.aux.prediction_type
        loss = losses.dsm(self.aux(x_t, t, batch.cond, kind), from_x0(x, x_t, t, kind, self.aux.schedule))
        return loss, {"loss/record/dsm": loss.detach(), "path/nodes": torch.tensor(float(step // c.snapshot_every))}

    def after_step(self, step: int) -> None:
        """Record node (step + 1) / snapshot_every in stage 1; after the last, F starts from it."""
        c = self.cfg
        if step < c.record_steps and (step + 1) % c.snapshot_every == 0:
            self.path.record((step + 1) // c.snapshot_every)
            if step + 1 == c.record_steps:
                self.start_backtracking()

    @torch.no_grad()
    def start_backtracking(self) -> None:
        """F <- s'_N: a LoRA critic takes the node's adapter weights; a full critic, untouched so far (the teacher's
        copy), takes the teacher's weights with the node's delta merged in where the adapter acts."""
        if isinstance(self.critic.adapter, str):
            self.path.load(self.N, self.critic.trainable_parameters())
            return
        model = self.critic.backbone.model
        for name, w in self.aux.backbone.merged_weights(self.aux.adapter).items():
            model.get_submodule(name).weight.copy_(w)
