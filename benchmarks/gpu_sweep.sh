#!/usr/bin/env bash
# Quality sweep of the digits DMD2 preset on a GPU (runs in parallel), scored by benchmarks/quick_eval.py.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/fsp && ln -sfn "$PWD/pipelines" /tmp/fsp/fewstep_pipelines
export PYTHONPATH=/tmp/site:/tmp/fsp:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/out}; S=/tmp/s; mkdir -p $S
STEPS=${STEPS:-900}
C="--train.evaluate false --train.sample_every 100000 --train.checkpoint_every 100000 --train.max_steps $STEPS"
run() { name=$1; shift; python3 train/dmd2.py --train.output_dir $S/$name $C "$@" > $S/$name.log 2>&1 & }
run w2
run w15 --method.guidance_scale 1.5
run w15_nogan --method.guidance_scale 1.5 --method.gan_weight_student 0 --model.gan_head false
run w15_gan1e2 --method.guidance_scale 1.5 --method.gan_weight_student 1e-2
run w15_lr2e4 --method.guidance_scale 1.5 --optim.student.lr 2e-4 --optim.critic.lr 2e-4
run w125 --method.guidance_scale 1.25
wait
for f in $S/*.log; do echo "== $f"; tail -c 400 $f | tr '\r' '\n' | tail -3; done > $OUT/logs.txt
python3 benchmarks/quick_eval.py $S/w2 $S/w15 $S/w15_nogan $S/w15_gan1e2 $S/w15_lr2e4 $S/w125 --samples 1000 2>&1 | tee $OUT/quick.txt | tail -8
