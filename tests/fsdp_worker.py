"""Worker for tests/test_fsdp.py, run by ``torchrun --nproc_per_node 2`` on CPU (gloo).

One DMD2 step (critic turn, then student turn) with every ResnetBlock2D and the method itself wrapped by
FSDP2's ``fully_shard`` (what accelerate's FSDP config does on GPUs), each rank on its half of the global
batch. Then the run's checkpoint state is gathered whole with ``fewstep.training.loop._state`` and written by rank 0,
reloaded into a freshly built, differently initialized sharded method with ``loop._restore`` and gathered
again. The test compares both files with a one-process run.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py TEACHER_DIR OUT_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep.core.ema import EMA  # noqa: E402
from fewstep.run import build  # noqa: E402
from fewstep.run import config as C  # noqa: E402
from fewstep.run.presets import PRESETS  # noqa: E402
from fewstep.training import distributed, loop, optim

# Adam eps 1e-3 keeps the first update proportional to the gradient (see tests/test_multiprocess.py)
ARGS = ["--preset", "digits_dmd2_4step", "--optim.student.eps", "1e-3",
        "--optim.critic.eps", "1e-3", "--train.ema_decay", "0.5"]


def build_method(teacher_dir: str, seed: int = 0, world: int = 1):
    """The method and batch source; ``data.batch_size`` is per process (accelerate's convention), so the
    global batch is 4 whatever ``world`` is."""
    cfg, _ = C.parse([*ARGS, "--data.batch_size", str(4 // world), "--model.teacher", teacher_dir,
                      "--train.seed", str(seed)], PRESETS["dmd2"], "digits_dmd2")
    teacher = build.load_teacher(cfg.model)
    source = build.make_source(cfg, teacher)
    torch.manual_seed(cfg.train.seed)
    return cfg, build.make_method(cfg, teacher), source


def shard(method) -> None:
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import fully_shard

    for m in list(method.modules()):
        if isinstance(m, ResnetBlock2D):
            fully_shard(m)
    fully_shard(method)


def optimizers(cfg, method):
    params = method.trainable()
    if distributed.is_sharded(method):
        distributed.init_sharded(method, params)      # as the training loop does under FSDP
    opts = {turn.name: optim.build(params[turn.name], cfg.optim[turn.name]) for turn in method.turns}
    return params, opts, EMA(params["student"], cfg.train.ema_decay)


def one_step(cfg, method, source, rank: int, world: int):
    """Step 0 of the training loop: every turn once, on this rank's share of the global batch."""
    params, opts, ema = optimizers(cfg, method)
    for ti, turn in enumerate(method.turns):
        loop._set_turn(params, turn.name)
        loss, _ = method(turn.name, source.batch(0, ti, 0, rank, world), 0)
        loss.backward()
        opts[turn.name][0].step()
        opts[turn.name][0].zero_grad(set_to_none=True)
        if turn.name == "student":
            ema.update()
    return opts, ema


def main() -> None:
    teacher_dir, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, method, source = build_method(teacher_dir, world=world)
    shard(method)
    opts, ema = one_step(cfg, method, source, rank, world)
    state = loop._state(method, opts, ema, 1, 0, root=method)
    if rank == 0:
        torch.save(state, out / "fsdp.pt")
    dist.barrier()
    # reload into a fresh, differently initialized sharded method and gather it again
    cfg2, fresh, _ = build_method(teacher_dir, seed=7, world=world)
    shard(fresh)
    _, opts2, ema2 = optimizers(cfg2, fresh)
    step, _, _ = loop._restore(torch.load(out / "fsdp.pt", weights_only=False), fresh, opts2, ema2, root=fresh)
    again = loop._state(fresh, opts2, ema2, step, 0, root=fresh)
    if rank == 0:
        torch.save(again, out / "fsdp_reloaded.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
