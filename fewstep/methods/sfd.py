"""SFD: Score Forgetting Distillation (Chen, Zhang & Zhou, ICLR 2025, arXiv 2409.11219), as a delta of SiD
(``methods/sid.py``): distil a one-step generator that has forgotten a class or a concept, without real data.

Implements
- SiD's turns and losses unchanged (alpha, the normaliser ``w = sg(mean|x_g - y_real|)``, the SiD-LSG kappas) on
  the *remain* samples, whose conditions are not forgotten;
- the score-forgetting term: a sample generated under a forget condition ``c_f`` (class or prompt),
  ``x_g = G(z, c_f)``, enters SiD's generator loss with the TEACHER at its override condition ``c_o`` against
  the critic at ``c_f``: ``y_real = f_phi(x_t, c_o)``, ``y_fake = f_psi(x_t, c_f)``, ``d = y_real - y_fake``,
  ``L_forget = sum d ((y_real - x_g) - alpha d) / w``: the student's score at ``c_f`` is pulled onto the
  teacher's at ``c_o``;
- the critic (fake score) trained by denoising on every generated sample under its own condition (``c_f`` for
  forget samples), so it tracks the student's distribution there;
- ``L = lambda_remain L_remain + lambda_forget L_forget`` with separate weights for critic and generator, per
  sample: a turn's loss is ``(1/B) sum_i lambda_g(i) l_i`` (the paper draws equal remain and forget batches);
- the official code's optional forget warm-up: for the first ``forget_warmup`` steps the forget terms draw t
  from [0.02, 0.98] instead of the configured ranges.

Forget samples: every sample the data drew under a forget condition (digits labels are uniform: class 6 is 1/10),
plus each other sample with probability ``forget_fraction``, re-conditioned on a forget condition chosen
uniformly; both draws follow the per-sample seeds, so a split batch draws the same. Remain samples never carry a
forget condition (the paper's remain set excludes the forgotten class). Prompt embeddings come from the run's
batch source (``Parts.encode``), so a forget prompt also in ``data.prompts`` is recognised by its embedding.

Config fields -> paper symbols: every SiD field (same meaning; the paper keeps alpha 1.2 on CIFAR-10, 1.0 on SD);
``forget_classes`` = the forget classes c_f (class teachers, data.source digits; e.g. 6); ``override_classes`` =
the override class c_o of each forget class, one to one (e.g. 0); ``forget_prompts`` = the forget concepts c_f as
prompts separated by "|" (text-to-image teachers; e.g. "brad pitt"); ``override_prompts`` = the override prompt c_o
of each forget prompt, separated by "|" (e.g. "a middle aged man"); ``forget_fraction`` = the share of the other
samples redrawn under a forget condition (0.5: the paper's equal remain and forget batches);
``critic_remain_weight`` = the fake-score network's remain coefficient (1.0); ``critic_forget_weight`` = its forget
coefficient (CIFAR-10 0.01, SD 1.0); ``student_remain_weight`` = the generator's remain coefficient (1.0);
``student_forget_weight`` = the generator's forget coefficient (CIFAR-10 0.01, SD 1.0); ``forget_warmup`` = steps
with the forget terms at t in [0.02, 0.98] (the official code gives a fraction of the run; 0 = none).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fewstep.core.conditioning import Batch, Cond
from fewstep.methods.base import Parts, require
from fewstep.methods.sid import SiD, SiDConfig

#: data.source digits draws the ten digit classes 0..9 (fewstep.digits.data.NUM_CLASSES; a test keeps them equal)
DIGIT_CLASSES = 10
#: salts of the per-sample draws "redrawn as forget" and "which pair" (SiD uses 1-4 and 100+)
FORGET_SALT = 70
#: the forget terms' t range during the warm-up (the official code's 0.02 N .. N - 0.02 N)
WARMUP_T = (0.02, 0.98)


@dataclass
class SFDConfig(SiDConfig):
    """SiD's fields plus the forget / override pairs and the remain / forget weights."""

    forget_classes: tuple[int, ...] = ()
    override_classes: tuple[int, ...] = ()
    forget_prompts: str = ""
    override_prompts: str = ""
    forget_fraction: float = 0.5
    critic_remain_weight: float = 1.0
    critic_forget_weight: float = 1.0
    student_remain_weight: float = 1.0
    student_forget_weight: float = 1.0
    forget_warmup: int = 0


def prompt_list(text: str) -> list[str]:
    """``"a|b"`` -> ``["a", "b"]`` (stripped); the empty string is no prompts."""
    return [p.strip() for p in text.split("|")] if text.strip() else []


def _tensors(c: Cond) -> dict[str, Tensor | None]:
    out = {}
    for f in fields(Cond):
        v = getattr(c, f.name)
        out.update({f"{f.name}.{k}": x for k, x in v.items()} if isinstance(v, dict) else {f.name: v})
    return out


def pair_index(cond: Cond, forget: list[Cond]) -> Tensor:
    """``[B]`` long: the index of the one-sample forget condition each sample of ``cond`` equals (every tensor
    equal), -1 for none."""
    a = _tensors(cond)
    ref = next(v for v in a.values() if v is not None)
    idx = torch.full((len(ref),), -1, dtype=torch.long, device=ref.device)
    for j in reversed(range(len(forget))):
        r, hit = _tensors(forget[j]), torch.ones_like(idx, dtype=torch.bool)
        for k in a.keys() | r.keys():
            x, y = a.get(k), r.get(k)
            if x is None or y is None or x.shape[1:] != y.shape[1:]:
                hit &= x is None and y is None
            else:
                hit &= (x == y.to(x.device)).reshape(len(x), -1).all(1)
        idx = torch.where(hit, j, idx)
    return idx


def put(cond: Cond, mask: Tensor, ref: Cond) -> Cond:
    """``cond`` with the samples in ``mask`` replaced by the one-sample condition ``ref``."""
    def pick(x, y):
        return None if x is None else torch.where(mask.to(x.device).view(-1, *[1] * (x.ndim - 1)), y.to(x), x)

    out = {}
    for f in fields(Cond):
        x, y = getattr(cond, f.name), getattr(ref, f.name)
        out[f.name] = {k: pick(v, y[k]) for k, v in x.items()} if isinstance(x, dict) else pick(x, y)
    return Cond(**out)


class OverrideTeacher(nn.Module):
    """The frozen teacher seen through the forget -> override map: a sample whose condition is a forget condition
    is evaluated at its override condition (``y_real = f_phi(x_t, c_o)``); every other sample, the null condition
    of classifier-free guidance included, as given. SiD's generator loss runs unchanged on top of it."""

    def __init__(self, teacher: nn.Module, pairs: list[tuple[Cond, Cond]]):
        super().__init__()
        self.inner, self.pairs = teacher, pairs

    @property
    def schedule(self):
        return self.inner.schedule

    @property
    def prediction_type(self) -> str:
        return self.inner.prediction_type

    @property
    def backbone(self):
        return self.inner.backbone

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond, out: str = "sample", dtype=torch.float32) -> Tensor:
        idx = pair_index(cond, [f for f, _ in self.pairs])     # all masks first: a chain 6 -> 0, 0 -> 1 stays one hop
        for j, (_, override) in enumerate(self.pairs):
            cond = put(cond, idx == j, override)
        return self.inner(x_t, t, cond, out, dtype)


def _ranks_in_step() -> bool:
    """Whether several processes run this step: then every rank runs both parts (FSDP gathers parameters per
    backbone call, so all ranks must make the same calls), an empty part as one sample weighted 0."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SFD(SiD):
    """SiD whose batches mix remain samples and forget samples matched to the teacher at the override condition."""

    name = "sfd"
    Config = SFDConfig

    def __init__(self, cfg: SFDConfig, teacher, student, critic, head: nn.Module | None = None,
                 pairs: list[tuple[Cond, Cond]] | None = None):
        super().__init__(cfg, teacher, student, critic, head)
        if pairs is None:      # class pairs come from the config; prompt pairs from the batch source (build)
            pairs = [(Cond(labels=torch.tensor([f])), Cond(labels=torch.tensor([o])))
                     for f, o in zip(cfg.forget_classes, cfg.override_classes)]
        self.pairs: list[tuple[Cond, Cond]] = []
        self.use_pairs(pairs)

    def use_pairs(self, pairs: list[tuple[Cond, Cond]]) -> None:
        """Forget / override conditions (one sample each); with pairs the teacher is seen through the override map.
        Each turn then runs its remain and forget parts as two sub-batches."""
        self.pairs = list(pairs)
        teacher = getattr(self.teacher, "inner", self.teacher)
        self.teacher = OverrideTeacher(teacher, self.pairs) if self.pairs else teacher

    @classmethod
    def build(cls, cfg: SFDConfig, parts: Parts) -> SFD:
        method = super().build(cfg, parts)      # SiD's networks and t-list check; class pairs from the config
        forget, override = prompt_list(cfg.forget_prompts), prompt_list(cfg.override_prompts)
        if forget:
            f, o = parts.encode(forget), parts.encode(override)
            method.use_pairs([(f[i:i + 1], o[i:i + 1]) for i in range(len(forget))])
        return method

    @classmethod
    def validate(cls, cfg: SFDConfig, model, data) -> None:
        super().validate(cfg, model, data)
        fc, oc = tuple(cfg.forget_classes), tuple(cfg.override_classes)
        fp, op = prompt_list(cfg.forget_prompts), prompt_list(cfg.override_prompts)
        classes = data.source == "digits"
        require(not fp or not classes, f"method.forget_prompts {cfg.forget_prompts!r}: data.source digits is a "
                "class-conditional teacher; pair classes instead (method.forget_classes 6, method.override_classes 0) "
                "and leave method.forget_prompts / override_prompts empty")
        require(not fc or classes, f"method.forget_classes {list(fc)}: data.source {data.source} conditions on "
                "prompts; pair prompts instead (method.forget_prompts / method.override_prompts, separated by |)")
        for kind, f, o in (("classes", list(fc), list(oc)), ("prompts", fp, op)):
            require(len(f) == len(o), f"method.forget_{kind} {f} and method.override_{kind} {o} pair one to one; "
                    f"give one override per forget condition")
            require(len(set(f)) == len(f), f"method.forget_{kind} names a condition twice ({f}); give each once")
        for f, o in zip(fc, oc):
            require(0 <= f < DIGIT_CLASSES and 0 <= o < DIGIT_CLASSES, f"method.forget_classes / override_classes "
                    f"pair {f} -> {o} is out of range; data.source digits has classes 0..{DIGIT_CLASSES - 1}")
        for f, o in list(zip(fc, oc)) + list(zip(fp, op)):
            require(f != o, f"method forget / override pair {f!r} -> {o!r} maps a condition onto itself and forgets "
                    "nothing; override it with another class or prompt")
        require(all(fp), f"method.forget_prompts {cfg.forget_prompts!r} holds an empty prompt (the null condition "
                "of guidance cannot be forgotten); remove the empty entry between the |")
        require(0 <= cfg.forget_fraction <= 1, f"method.forget_fraction {cfg.forget_fraction} must be in [0, 1]")
        require(not fp or cfg.forget_fraction > 0, "method.forget_fraction 0 with forget prompts: no sample would be "
                "generated under a forget prompt; set it > 0 (0.5: the paper's equal remain and forget batches)")
        for w in ("critic_remain_weight", "critic_forget_weight", "student_remain_weight", "student_forget_weight"):
            require(getattr(cfg, w) >= 0, f"method.{w} {getattr(cfg, w)} must be >= 0 (the paper: remain 1.0; "
                    "forget 1.0 on SD, 0.01 on CIFAR-10)")
        require(cfg.forget_warmup >= 0, f"method.forget_warmup {cfg.forget_warmup} must be >= 0 (steps; 0 = none)")
        require(not (fc or fp) or not model.gan_head, "model.gan_head true with forget pairs: SFD is data-free and a "
                "discriminator on real images would teach the forgotten condition back; set model.gan_head false")

    # ------------------------------------------------------------------------------------------------ turns
    def assign(self, batch: Batch) -> Tensor:
        """``[B]`` pair index of each sample, -1 for remain: the data's own forget conditions, plus the other
        samples redrawn as forget with probability ``forget_fraction`` (per-sample seeds)."""
        idx = pair_index(batch.cond, [f for f, _ in self.pairs])
        drawn = batch.rand(FORGET_SALT, idx.device) < self.cfg.forget_fraction
        which = (batch.rand(FORGET_SALT + 1, idx.device) * len(self.pairs)).long().clamp_max(len(self.pairs) - 1)
        return torch.where((idx < 0) & drawn, which, idx)

    def forget_batch(self, batch: Batch) -> tuple[Batch, Tensor]:
        """The batch with every forget sample conditioned on its forget condition, and its pair indices."""
        idx = self.assign(batch)
        cond = batch.cond
        for j, (forget, _) in enumerate(self.pairs):
            cond = put(cond, idx == j, forget)
        return replace(batch, cond=cond), idx

    @contextmanager
    def forget_times(self, step: int):
        """During the warm-up, SiD's losses read the wide t range for the forget part."""
        saved = self.cfg
        if step < saved.forget_warmup:
            lo, hi = WARMUP_T
            self.cfg = replace(saved, t_min=lo, t_max=hi, critic_t_min=lo, critic_t_max=hi)
        try:
            yield
        finally:
            self.cfg = saved

    def forward(self, turn: str, batch: Batch, step: int):
        if not self.pairs or turn not in ("critic", "student"):
            return super().forward(turn, batch, step)
        c = self.cfg
        weights = {"critic": (c.critic_remain_weight, c.critic_forget_weight),
                   "student": (c.student_remain_weight, c.student_forget_weight)}[turn]
        batch, idx = self.forget_batch(batch)
        total, logs = None, {"sfd/forget_share": (idx >= 0).float().mean()}
        for part, weight in zip(("remain", "forget"), weights):
            members = ((idx >= 0) == (part == "forget")).nonzero().flatten().cpu()
            share = len(members) / len(batch)
            if not len(members):
                if not _ranks_in_step():
                    continue
                members, weight = members.new_zeros(1), 0.0
            sub = batch if len(members) == len(batch) else batch.subset(members)
            with self.forget_times(step) if part == "forget" else nullcontext():
                loss, part_logs = super().forward(turn, sub, step)
            total = weight * share * loss if total is None else total + weight * share * loss
            if weight or share:
                logs.update({f"loss/{turn}/{part}": loss.detach(), **{f"{part}/{k}": v for k, v in part_logs.items()}})
        return total, logs
