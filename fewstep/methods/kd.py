"""Knowledge distillation on teacher ODE trajectories: the Denoising Student of Luhman & Luhman, "Knowledge
Distillation in Iterative Generative Models for Improved Sampling Speed" (arXiv 2101.02388), the "KD" baseline
that NVlabs FastGen also offers.

The paper samples pairs ``(x_T, F_teacher(x_T))`` once with the teacher's deterministic DDIM sampler (eta = 0;
1.024M of them) and trains a one-step student ``F_student``, initialised from the teacher, by the student objective

    L_student = E_{x_T ~ N(0, I)} [ 1/2 || F_student(x_T) - F_teacher(x_T) ||_2^2 ].

Implemented:
- ``F_teacher``: S DDIM steps (arXiv 2010.02502, eq. 12, sigma_t = 0) ``x_s = alpha_s x0_w + sigma_s eps_w`` of the
  guided teacher, ``x0_w = x0_u + w (x0_c - x0_u)`` (fewstep's CFG; w = 1 no guidance), eps_w the noise it implies,
  on the trailing grid of timesteps ``tau_top - i N / S`` (i < S: 999, 979, ..., 19 for S = 50 on 1000 VP steps),
  the last step to t = 0: step for step the stock ``DDIMScheduler`` loop (trailing, no ``set_alpha_to_one``) of the
  digits teacher. In lora mode the teacher is the base with the adapters disabled;
- pairs: ``x_T = z`` and its condition are sample j of the run's batch source at a turn index no training turn uses
  (``PAIR_TURN``): pair j does not depend on the batch size, the process count or a resume;
- the loss: the objective above averaged per element (a constant factor), d = l2, or the pseudo-Huber distance
  ``sqrt(e^2 + c^2) - c`` (iCT, arXiv 2310.14189), robust and free of LPIPS;
- multi-step students (t_0 = 1 > t_1 > ... > t_{K-1}; beyond the paper, as FastGen's KD trains on the teacher's
  path): the trajectory is kept at every student time and step k learns ``d(x0_theta(x_{t_k}, t_k), F_teacher(z))``,
  the teacher's own state to its clean sample, k uniform per sample. The student samples as every fewstep student
  (x0, then fresh noise to t_{k+1}: stock LCM / FlowMatchLCM schedulers), so step k meets ``alpha x0 + sigma eps``,
  which for an exact teacher has the law of the ODE state x_{t_k} (the probability-flow ODE keeps the marginals).
  State-to-state targets x_{t_{k+1}} would need deterministic DDIM jumps between steps, which the exported stock
  schedulers do not make. A K-step student thus samples the teacher's law, not ``F_teacher`` of its own z.

The cache: ``<train.output_dir>/kd_pairs/shard_<c>.pt``, one per chunk c of ``data.batch_size`` pairs (the last
shorter): ``{"key", "x_t" [n, K, ...] (the path at the student times, x_t[:, 0] = z), "x0", "cond" (Cond fields),
"seeds"}``, float32, made at the first student turn. Written under a temporary name and renamed, a shard is whole or
absent: a killed run keeps the shards it finished, the next makes only the missing ones. Shards are memory-mapped.
One whose key (teacher steps, guidance, student timesteps, chunk size and rows, source seed) differs is made again.
Several processes share the missing shards out (each makes all, in one order, under an FSDP-sharded teacher, whose
passes are collectives) and read the others' from the run folder, which they must share.

Config fields -> paper symbols: ``pairs`` = the number of cached pairs ``(x_T, F_teacher(x_T))``; ``teacher_steps``
= S, the DDIM steps of F_teacher; ``guidance_scale`` = w, the teacher's CFG scale; ``loss`` = the distance d
(l2 or pseudo_huber); ``huber_c`` = c of the pseudo-Huber distance.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from fewstep.core import losses
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator, ddim_step
from fewstep.core.guidance import cfg as guided
from fewstep.core.schedules import NoiseSchedule
from fewstep.core.timesteps import ddim_grid
from fewstep.errors import CheckpointError, ConfigError
from fewstep.methods.base import Method, Parts, Turn, require

LOSSES = ("l2", "pseudo_huber")
CACHE = "kd_pairs"
PAIR_TURN = 1_000_003      # the source's turn index of the pairs: training turns are 0, 1, ..., so no seed is shared


@dataclass
class KDConfig:
    """KD hyperparameters (see the module docstring for the paper symbols)."""

    pairs: int = 1024
    teacher_steps: int = 50
    guidance_scale: float = 2.0
    loss: str = "l2"
    huber_c: float = 1e-3


def kd_loss(x0: Tensor, x0_teacher: Tensor, kind: str = "l2", c: float = 1e-3) -> Tensor:
    """``mean(d(x0 - x0_teacher))``: l2 ``e^2`` or pseudo-Huber ``sqrt(e^2 + c^2) - c``, in float32."""
    return losses.pseudo_huber(x0, x0_teacher, c if kind == "pseudo_huber" else 0.0)


def grid_index(schedule: NoiseSchedule, S: int, t_list: Tensor) -> list[int] | None:
    """The grid index of each student time, or None when one of them is not a time of the S-step grid."""
    grid = schedule.timestep(ddim_grid(schedule, S)[:-1])
    idx = []
    for tau in schedule.timestep(t_list).tolist():
        hit = ((grid - tau).abs() < 1e-3).nonzero()
        if not len(hit):
            return None
        idx.append(int(hit[0]))
    return idx


@torch.no_grad()
def trajectory(teacher: Denoiser, z: Tensor, cond: Cond, uncond: Cond, grid: Tensor, keep: list[int], w: float):
    """``F_teacher(z)``: DDIM (eta 0) with CFG w over ``grid``, in float64 (the backbone in its own dtype). Returns
    the states at the grid indices ``keep`` ``[B, len(keep), ...]`` and the sample at t = 0, in float32."""
    x, kept = z.double(), []
    for i in range(len(grid) - 1):
        if i in keep:
            kept.append(x.float())
        t, s = grid[i].to(z.device).expand(len(z)), grid[i + 1].to(z.device).expand(len(z))
        x = ddim_step(teacher.schedule, x, t, s, guided(teacher, x, t, cond, uncond, w, dtype=torch.float64))
    return torch.stack(kept, 1), x.float()


def read_shard(path: Path, key: dict) -> dict | None:
    """The shard at ``path`` (memory-mapped) when it was made with ``key``, else None (absent, foreign, unreadable)."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    return shard if isinstance(shard, dict) and shard.get("key") == key else None


def write_shard(path: Path, shard: dict) -> None:
    """Write under a temporary name, then rename: a kill leaves the shard whole or absent, never half written."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(shard, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:      # a full disk shows up as either
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write the KD pair shard {path} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); free disk space or fix permissions, then re-run the "
                              "same command: the shards already written are kept") from None


def _processes() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class KD(Method):
    """Knowledge distillation with one ``Turn("student")`` on cached teacher trajectories."""

    name = "kd"
    Config = KDConfig
    turns = (Turn("student"),)

    @classmethod
    def build(cls, cfg: KDConfig, parts: Parts) -> "KD":
        return cls(cfg, parts.teacher, parts.student(), parts.source, Path(parts.run_dir) / CACHE)

    @classmethod
    def validate(cls, cfg: KDConfig, model, data) -> None:
        require(cfg.pairs >= 1, f"method.pairs {cfg.pairs} must be at least 1 (noise -> teacher-sample pairs to cache)")
        require(cfg.teacher_steps >= 1, f"method.teacher_steps {cfg.teacher_steps} must be at least 1 (DDIM steps of "
                "the teacher's sampler)")
        require(cfg.guidance_scale >= 0, f"method.guidance_scale {cfg.guidance_scale} must be >= 0 (uncond + w (cond "
                "- uncond); 1 = no guidance)")
        require(cfg.loss in LOSSES, f"method.loss {cfg.loss!r} is not known; use {' or '.join(LOSSES)}")
        require(cfg.loss != "pseudo_huber" or cfg.huber_c > 0, f"method.huber_c {cfg.huber_c} must be > 0 for "
                "method.loss pseudo_huber (or set method.loss l2)")
        require(not model.gan_head, "model.gan_head true: KD regresses onto teacher samples and has no "
                "discriminator; set model.gan_head false")

    def __init__(self, cfg: KDConfig, teacher: Denoiser, student: FewStepGenerator, source, folder: str | Path):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher.requires_grad_(False), student
        self.source, self.folder = source, Path(folder)     # the batch source the pairs' z and conditions come from
        self.grid = ddim_grid(teacher.schedule, cfg.teacher_steps)
        self.keep = self._check_t_list(teacher.schedule)
        self.shards: list[tuple[Tensor, Tensor, Cond]] | None = None

    def _check_t_list(self, sch: NoiseSchedule) -> list[int]:
        S, t_list = self.cfg.teacher_steps, self.student.t_list.cpu()
        ts = [int(v) if float(v).is_integer() else float(v) for v in sch.timestep(t_list).tolist()]
        top = float(sch.timestep(torch.tensor(1.0)))
        if abs(ts[0] - top) > 1e-3:
            raise ConfigError(f"model.student_timesteps {ts}: the KD student maps the teacher's noise at t = 1; start "
                              f"the list at {int(top) if top.is_integer() else top}")
        if S > sch.N:
            raise ConfigError(f"method.teacher_steps {S} exceeds the teacher's {sch.N} training timesteps; use at "
                              f"most {sch.N}")
        keep = grid_index(sch, S, t_list)
        if keep is None:
            fit = next((n for n in range(S + 1, sch.N + 1) if grid_index(sch, n, t_list) is not None), None)
            grid = [int(v) for v in sch.timestep(self.grid[:3]).tolist()]
            raise ConfigError(f"model.student_timesteps {ts} are not all on the teacher's {S}-step DDIM grid "
                              f"({', '.join(map(str, grid))}, ...); " + (f"set method.teacher_steps {fit}, whose grid "
                              "holds them" if fit else "choose student timesteps on that grid"))
        return keep

    def trainable(self):
        return {"student": self.student.denoiser.trainable_parameters()}

    def checkpoint_modules(self):
        return {"student": self.student}

    # ------------------------------------------------------------------ the pair cache
    def rows(self, c: int) -> int:
        """Pairs in shard c: the chunk size, fewer in the last shard."""
        return min(self.source.batch_size, self.cfg.pairs - c * self.source.batch_size)

    def key(self, c: int) -> dict:
        """What shard c was made with: a shard made otherwise is made again."""
        ts = self.teacher.schedule.timestep(self.student.t_list.cpu()).tolist()
        return {"teacher_steps": self.cfg.teacher_steps, "guidance_scale": float(self.cfg.guidance_scale),
                "timesteps": ts, "chunk": int(self.source.batch_size), "rows": self.rows(c),
                "seed": int(getattr(self.source, "seed", 0))}

    def make_shard(self, c: int, device) -> dict:
        """Chunk c: samples c B .. c B + rows - 1 of the source (micro-batch c of one process: split-invariant seeds)
        through the teacher's sampler."""
        n, batch = self.rows(c), self.source.batch(0, PAIR_TURN, c).to(device)
        cond, uncond = batch.cond[:n], batch.uncond[:n]
        x_t, x0 = trajectory(self.teacher, batch.noise[:n], cond, uncond, self.grid, self.keep, self.cfg.guidance_scale)
        cond = cond.to("cpu")
        return {"key": self.key(c), "x_t": x_t.cpu(), "x0": x0.cpu(), "seeds": batch.seeds[:n].clone(),
                "cond": {f.name: getattr(cond, f.name) for f in fields(Cond)}}

    def prepare(self, device) -> None:
        """Load the pair cache, making the shards it lacks (module docstring), once per process."""
        if self.shards is not None:
            return
        if self.source is None:
            raise ValueError("KD makes its pairs from the run's batch source: build it with make_method(cfg, teacher, "
                             "source)")
        rank, world = _processes()
        n = math.ceil(self.cfg.pairs / self.source.batch_size)
        shards = [read_shard(self.folder / f"shard_{c:06d}.pt", self.key(c)) for c in range(n)]
        if rank == 0:       # a kill inside torch.save leaves a temporary file; no process writes before the barrier
            for stale in self.folder.glob("shard_*.pt.tmp*"):
                stale.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()      # all have looked before any writes: each finds the same shards missing
        missing = [c for c in range(n) if shards[c] is None]
        from torch.distributed.tensor import DTensor  # here, not at import: it takes a second to import

        sharded = any(isinstance(p, DTensor) for p in self.teacher.parameters())
        mine = missing if sharded else missing[rank::world]
        if missing and rank == 0:
            print(f"kd: making {len(missing)} of {n} pair shards ({self.cfg.teacher_steps} DDIM steps, CFG "
                  f"{self.cfg.guidance_scale}) in {self.folder}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        for i, c in enumerate(mine):
            shards[c] = self.make_shard(c, device)
            if rank == 0 or not sharded:
                write_shard(self.folder / f"shard_{c:06d}.pt", shards[c])
            if rank == 0 and (i + 1) % max(1, len(mine) // 10) == 0:
                print(f"kd: {i + 1}/{len(mine)} shards, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if world > 1:
            dist.barrier()
        for c in missing:
            if shards[c] is None:       # made by another process
                shards[c] = read_shard(self.folder / f"shard_{c:06d}.pt", self.key(c))
            if shards[c] is None:
                raise RuntimeError(f"kd: pair shard {c} is missing from {self.folder} after another process made it; "
                                   "every process must see the same run folder")
        self.shards = [(s["x_t"], s["x0"], Cond(**s["cond"])) for s in shards]

    def pairs_at(self, j: list[int], k: list[int], device) -> tuple[Tensor, Tensor, Cond]:
        """The teacher's state at student time k, its sample and the condition of each pair j."""
        B = self.source.batch_size
        rows = [(self.shards[i // B], i % B) for i in j]
        x_t = torch.stack([s[0][r, kk] for (s, r), kk in zip(rows, k)])
        x0 = torch.stack([s[1][r] for s, r in rows])
        cond = Cond.cat(*[s[2][r:r + 1] for s, r in rows])
        return x_t.to(device), x0.to(device), cond.to(device)

    # ------------------------------------------------------------------ the student turn
    def forward(self, turn: str, batch: Batch, step: int):
        if turn != "student":
            raise ValueError(f"KD has one turn, 'student', not {turn!r}")
        device, N, K = batch.noise.device, self.cfg.pairs, self.student.K
        self.prepare(device)
        # a pair and a student step per sample, from the batch's seeds: split-invariant, repeated by a resume
        j = (batch.rand(0, device) * N).long().clamp(max=N - 1)
        k = (batch.rand(1, device) * K).long().clamp(max=K - 1)
        x_t, x0_teacher, cond = self.pairs_at(j.tolist(), k.tolist(), device)
        x0 = self.student.x0(self.student.denoiser, x_t, self.student.t_list.to(device)[k], cond)
        loss = kd_loss(x0, x0_teacher, self.cfg.loss, self.cfg.huber_c)
        rmse = (x0.detach().float() - x0_teacher).pow(2).mean().sqrt()
        return loss, {"loss/student/kd": loss.detach(), "kd/rmse": rmse, "kd/step": k.float().mean()}
