#!/usr/bin/env bash
# One prepared GPU session (device tool) for issues 3 and 6: every digits trainer at 1, 2 and 4 steps side
# by side (benchmarks/sweep.py; metrics.json per run -> eval/benchmark.py --methods-table), and beside it
# the FSDP check on a full-size SD1.5 UNet (benchmarks/fsdp_sd15.sh). Everything small comes back in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/fsp && ln -sfn "$PWD/pipelines" /tmp/fsp/fewstep_pipelines
export PYTHONPATH=/tmp/site:/tmp/fsp:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
{ nvidia-smi -L; python3 -c "import torch, diffusers, accelerate; print(torch.__version__, diffusers.__version__, accelerate.__version__)"; nproc; } > $OUT/gpu.txt 2>&1
(timeout 420 bash benchmarks/fsdp_sd15.sh /tmp/fsdp > $OUT/fsdp.log 2>&1; echo "fsdp rc=$?" >> $OUT/fsdp.log) &
timeout ${SWEEP_TIMEOUT:-450} python3 benchmarks/sweep.py --out /tmp/m --jobs 16 --threads 1 \
  "dmd2_1:dmd2=" "dmd2_2:dmd2=--preset digits_dmd2_2step" "dmd2_4:dmd2=--preset digits_dmd2_4step" \
  "sid_1:sid=" "sid_2:sid=--preset digits_sid_2step" "sid_4:sid=--preset digits_sid_4step" \
  "fdistill_1:fdistill=" "fdistill_2:fdistill=--preset digits_fdistill_2step" "fdistill_4:fdistill=--preset digits_fdistill_4step" \
  "phased_2:phased_dmd=--preset digits_phased_dmd_2phase" "phased_4:phased_dmd=" \
  "lcm_1:consistency=--preset digits_consistency_1step" "lcm_2:consistency=--preset digits_consistency_2step" \
  "lcm_4:consistency=" "tscd_4:consistency=--preset digits_tscd" > $OUT/sweep.log 2>&1
echo "sweep rc=$?" >> $OUT/sweep.log
python3 eval/benchmark.py --methods-table /tmp/m --out /tmp/m/table > $OUT/table.log 2>&1
cp /tmp/m/table/methods.md $OUT/ 2>/dev/null
wait
tar czf $OUT/runs.tgz --exclude='*.safetensors' --exclude='checkpoints' --exclude='*.pt' -C /tmp m
tail -5 $OUT/fsdp.log; tail -20 $OUT/sweep.log; cat $OUT/methods.md
