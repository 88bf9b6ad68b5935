#!/usr/bin/env bash
# One prepared GPU session (device tool): main-job step time, SD1.5-size full vs LoRA DMD2 steps, and a
# hyperparameter sweep of the digits DMD2 preset. Writes everything to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/fsp && ln -sfn "$PWD/pipelines" /tmp/fsp/fewstep_pipelines
export PYTHONPATH=/tmp/site:/tmp/fsp:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}
nvidia-smi -L | tee $OUT/gpu.txt
python3 -c "import torch, diffusers, peft, accelerate; print(torch.__version__, diffusers.__version__, peft.__version__, accelerate.__version__)" | tee -a $OUT/gpu.txt
python3 benchmarks/step_time.py --device cuda --precision bf16 --steps 100 --warmup 20 > $OUT/step_time_bf16.json; cat $OUT/step_time_bf16.json
python3 benchmarks/step_time.py --device cuda --precision fp32 --steps 100 --warmup 20 > $OUT/step_time_fp32.json; cat $OUT/step_time_fp32.json
python3 benchmarks/sd15_lora_memory.py --device cuda --batch 1 --steps 3 --json $OUT/sd15_b1.json | tail -3
python3 benchmarks/sd15_lora_memory.py --device cuda --batch 4 --steps 3 --json $OUT/sd15_b4.json | tail -3
python3 -c "
from pathlib import Path; from fewstep.run.report import fixed_teacher_reference as teacher_reference
import json; print(json.dumps(teacher_reference(Path('fewstep/assets/digits_teacher'), 2000)))" > $OUT/teacher_reference.json
S="--train.sample_every 500 --train.checkpoint_every 500"
timeout 420 python3 benchmarks/sweep.py --out /tmp/sweep --jobs 10 --threads 1 \
  "base=$S" \
  "nogan=$S --method.gan_weight_student 0 --model.gan_head false" \
  "gan1e2=$S --method.gan_weight_student 1e-2" \
  "lr3e4=$S --optim.student.lr 3e-4 --optim.critic.lr 3e-4" \
  "every2=$S --method.student_every 2" \
  "w15=$S --method.guidance_scale 1.5" \
  "w3=$S --method.guidance_scale 3" \
  "ema999=$S --train.ema_decay 0.999" \
  "short800=$S --train.max_steps 800" \
  "four=$S --preset digits_dmd2_4step" > $OUT/sweep.log 2>&1
cp /tmp/sweep/sweep.md /tmp/sweep/sweep.json $OUT/ 2>/dev/null
cat $OUT/sweep.log | tail -15
