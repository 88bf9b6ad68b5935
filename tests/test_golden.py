"""The first steps of the main job (``train/dmd2.py``, preset digits_dmd2, seed 0) pinned to recorded losses.

The values were recorded from the entry script (``FEWSTEP_TRACE``, one torch thread) when both turns of a step
began to read one batch (the critic trains on the student turn's own draw, as DMD2's loop does); the critic's
step-0 values equal those recorded before the package was split into layers, to float rounding. A change to
seed derivation, batch order, turn order or a loss cannot pass silently: each would move these numbers far
more than the tolerance, which only absorbs float reassociation."""
import json

import pytest
import torch

# (step, turn) -> {log key: value}; the critic turns every step, the student turn every 5th (TTUR 5)
GOLDEN = {
    (0, "critic"): {"loss": 0.12098591774702072, "loss/critic/dsm": 0.10680151730775833,
                    "loss/critic/gan": 1.4184398651123047},
    (0, "student"): {"loss": 0.10529765486717224, "loss/student/dmd": 0.09966079890727997,
                     "loss/student/gan": 0.5636857748031616},
    (1, "critic"): {"loss": 0.14863529801368713, "loss/critic/dsm": 0.13456396758556366,
                    "loss/critic/gan": 1.4071331024169922},
    (2, "critic"): {"loss": 0.1057867556810379, "loss/critic/dsm": 0.09174751490354538,
                    "loss/critic/gan": 1.4039242267608643},
    (3, "critic"): {"loss": 0.17005448043346405, "loss/critic/dsm": 0.1560956835746765,
                    "loss/critic/gan": 1.3958790302276611},
    (4, "critic"): {"loss": 0.10766875743865967, "loss/critic/dsm": 0.09383921325206757,
                    "loss/critic/gan": 1.3829541206359863},
    (5, "critic"): {"loss": 0.1447351723909378, "loss/critic/dsm": 0.13108882308006287,
                    "loss/critic/gan": 1.3646347522735596},
    (5, "student"): {"loss": 0.2154938280582428, "loss/student/dmd": 0.20851226150989532,
                     "loss/student/gan": 0.6981568932533264},
}


def test_first_steps_of_the_main_job_equal_the_recorded_losses(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from fewstep.run import cli

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("FEWSTEP_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        cli.main("dmd2", argv=["--train.max_steps", "6", "--train.evaluate", "false",
                               "--train.output_dir", str(tmp_path / "run")])
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
