"""FSDP2 checkpoints hold the whole state: a 2-process sharded DMD2 step (torchrun, gloo, CPU) gathers to
the same parameters, optimizer moments and EMA as a 1-process step on the same global batch, and that
checkpoint reloads into a sharded run (bit-identical on re-gathering) and into an unsharded one.

accelerate runs FSDP on GPUs only (on CPU it silently falls back to plain multi-CPU), so the sharding here
is ``fully_shard`` applied directly, as accelerate's FSDP2 config applies it; the checkpoint code is the
training loop's own (``loop._state`` / ``loop._restore``)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_worker  # noqa: E402

from fewstep.training import loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_checkpoint_is_whole_and_reloads(tiny_teacher_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", str(ROOT / "tests" / "fsdp_worker.py"), str(tiny_teacher_dir),
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    reloaded = torch.load(tmp_path / "fsdp_reloaded.pt", weights_only=False)

    # the same step in one process on the whole global batch
    cfg, method, source = fsdp_worker.build_method(str(tiny_teacher_dir))
    opts, ema = fsdp_worker.one_step(cfg, method, source, 0, 1)
    ref = loop._state(method, opts, ema, 1, 0)
    name = {id(p): n for n, p in method.named_parameters()}

    # parameters: equal up to the round-off of splitting the batch (tolerance as in test_multiprocess)
    for k, sd in ref["modules"].items():
        assert sharded["modules"][k].keys() == sd.keys()
        for n, v in sd.items():
            assert sharded["modules"][k][n].shape == v.shape, n
            torch.testing.assert_close(sharded["modules"][k][n], v, atol=1e-5, rtol=1e-4, msg=n)
    # optimizer: every trained parameter's Adam moments are whole and equal, keyed by parameter name
    for turn, (opt, _) in opts.items():
        got = sharded["optimizers"][turn]["state"]
        ps = [p for g in opt.param_groups for p in g["params"]]
        assert set(got) == {name[id(p)] for p in ps}
        for p in ps:
            for moment in ("exp_avg", "exp_avg_sq"):
                want = opt.state[p][moment]
                torch.testing.assert_close(got[name[id(p)]][moment], want, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(sharded["ema"]["shadow"], ref["ema"]["shadow"], atol=1e-5, rtol=1e-4)

    # reloaded into a differently initialized sharded run: gathers back bit for bit
    for k in sharded["modules"]:
        for n, v in sharded["modules"][k].items():
            assert torch.equal(reloaded["modules"][k][n], v), n
    for turn in sharded["optimizers"]:
        for n, st in sharded["optimizers"][turn]["state"].items():
            for m, v in st.items():
                assert torch.equal(reloaded["optimizers"][turn]["state"][n][m], v), (n, m)
    assert all(torch.equal(a, b) for a, b in zip(reloaded["ema"]["shadow"], sharded["ema"]["shadow"]))

    # and into an unsharded one-process run (resume with fewer processes)
    _, plain, _ = fsdp_worker.build_method(str(tiny_teacher_dir), seed=7)
    _, opts3, ema3 = fsdp_worker.optimizers(cfg, plain)
    loop._restore(sharded, plain, opts3, ema3)
    for k, m in plain.checkpoint_modules().items():
        for n, v in m.state_dict().items():
            assert torch.equal(v, sharded["modules"][k][n]), n
    name3 = {id(p): n for n, p in plain.named_parameters()}
    for turn, (opt, _) in opts3.items():
        for p in (p for g in opt.param_groups for p in g["params"]):
            assert torch.equal(opt.state[p]["exp_avg"], sharded["optimizers"][turn]["state"][name3[id(p)]]["exp_avg"])
