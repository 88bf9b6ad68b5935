"""The first steps of the main job (``train/dmd2.py``, preset digits_dmd2 at its recorded recipe: real-score
guidance 1.25, GAN weights 1e-2; seed 0) pinned to recorded losses.

The values were recorded from the entry script before the package was split into layers (``FEWSTEP_TRACE``,
one torch thread). A change to seed derivation, batch order, turn order or a loss cannot pass silently: each
would move these numbers far more than the tolerance, which only absorbs float reassociation."""
import json

import pytest
import torch

# (step, turn) -> {log key: value}; the critic turns every step, the student turn every 5th (TTUR 5)
GOLDEN = {
    (0, "critic"): {"loss": 0.12098592519760132, "loss/critic/dsm": 0.10680152475833893,
                    "loss/critic/gan": 1.4184398651123047},
    (0, "student"): {"loss": 0.09705422818660736, "loss/student/dmd": 0.09166888892650604,
                     "loss/student/gan": 0.5385336875915527},
    (1, "critic"): {"loss": 0.14863894879817963, "loss/critic/dsm": 0.13457077741622925,
                    "loss/critic/gan": 1.4068174362182617},
    (2, "critic"): {"loss": 0.10576575994491577, "loss/critic/dsm": 0.09172838181257248,
                    "loss/critic/gan": 1.403738021850586},
    (3, "critic"): {"loss": 0.17008361220359802, "loss/critic/dsm": 0.15612581372261047,
                    "loss/critic/gan": 1.3957802057266235},
    (4, "critic"): {"loss": 0.10752034187316895, "loss/critic/dsm": 0.09369722008705139,
                    "loss/critic/gan": 1.382312536239624},
    (5, "critic"): {"loss": 0.1448202282190323, "loss/critic/dsm": 0.1311768889427185,
                    "loss/critic/gan": 1.3643333911895752},
    (5, "student"): {"loss": 0.24752795696258545, "loss/student/dmd": 0.24086418747901917,
                     "loss/student/gan": 0.6663775444030762},
}


def test_first_steps_of_the_main_job_equal_the_recorded_losses(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from fewstep.run import cli

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("FEWSTEP_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        # the recipe the values were recorded with (digits_dmd2 then; its guidance and GAN weights have since moved)
        cli.main("dmd2", argv=["--train.max_steps", "6", "--train.evaluate", "false",
                               "--method.guidance_scale", "1.25", "--method.gan_weight_student", "1e-2",
                               "--method.gan_weight_critic", "1e-2", "--train.output_dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    seen = {}
    for line in (tmp_path / "trace.rank0.jsonl").read_text().splitlines():
        row = json.loads(line)
        seen[(row["step"], row["turn"])] = {"loss": row["loss"], **row["logs"]}
    assert set(GOLDEN) <= set(seen)
    for key, want in GOLDEN.items():
        for name, value in want.items():
            assert seen[key][name] == pytest.approx(value, rel=2e-4, abs=1e-6), (key, name)
