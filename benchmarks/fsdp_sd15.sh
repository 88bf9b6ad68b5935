#!/usr/bin/env bash
# One FSDP2 DMD2 step-pair on a full-size random SD1.5 UNet through train/accelerate/fsdp.yaml, a checkpoint
# of the whole state, and a resume from it (issue 6). GPU: bash benchmarks/fsdp_sd15.sh /tmp/fsdp
# CPU check of the command lines only (tiny UNet, no FSDP): FSDP_CHECK_CPU=1 bash benchmarks/fsdp_sd15.sh /tmp/x
set -eu
W=${1:-/tmp/fsdp}
mkdir -p "$W"
if [ -n "${FSDP_CHECK_CPU:-}" ]; then
  python3 benchmarks/make_sd15_random.py "$W/teacher" --tiny
  LAUNCH=(python3)
else
  python3 benchmarks/make_sd15_random.py "$W/teacher"
  LAUNCH=(accelerate launch --config_file train/accelerate/fsdp.yaml --num_processes 1)
fi
ARGS=(train/dmd2.py --preset sd15_dmd2 --model.teacher "$W/teacher" --data.prompts "$W/teacher/prompts.txt"
      --data.batch_size 1 --method.student_every 1 --train.checkpoint_every 1 --train.sample_every 1000
      --train.evaluate false --train.output_dir "$W/run")
/usr/bin/time -f "first run (2 steps + export): %e s, max RSS %M KB" "${LAUNCH[@]}" "${ARGS[@]}" --train.max_steps 2
/usr/bin/time -f "resumed run (step 3): %e s" "${LAUNCH[@]}" "${ARGS[@]}" --train.max_steps 3 2>&1 | tee "$W/resume.log"
grep -q "resumed from" "$W/resume.log"
python3 - "$W/run" <<'PY'
import sys, torch
from pathlib import Path
run = Path(sys.argv[1])
st = torch.load(sorted((run / "checkpoints").glob("step_*"))[-1] / "state.pt", map_location="cpu", weights_only=False)
n = {k: sum(v.numel() for v in sd.values()) for k, sd in st["modules"].items()}
opt = {k: (len(o["state"]), sum(t.numel() for s in o["state"].values() for t in s.values() if t.dim() > 0))
       for k, o in st["optimizers"].items()}
print(f"checkpoint step {st['step']} sharded={st.get('sharded', False)}: module params {n}; "
      f"optimizer entries (params, moment elements) {opt}")
for k in ("student", "critic"):
    assert opt[k][1] == 2 * n[k], (k, opt[k], n[k])     # exp_avg + exp_avg_sq for every parameter, whole
print("optimizer state is whole: 2 moments x every trainable parameter")
PY
ls -la "$W/run/unet"
