#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md on one H100 or H200 with the machine's own JAX (CUDA): the train step of echo_1p3b
# (MFU against the data-sheet bf16 peak) and the sampler's real-time factor for 30 s of audio, 32 steps, independent
# CFG, for echo_1p3b (DACVAE, 25 frames/s) and echo_base_fish (Fish-S1-DAC, 21.53 frames/s). Random weights.
#
#     bash bench/gpu_figures.sh OUT_DIR [NAME ...]
#     # NAME: train_1p3b sampler_1p3b sampler_fish restart_1p3b restore_1p3b
#
# On a machine whose image lacks them (the workplace's H100/H200 image, 2026-11-28), the pinned orbax-checkpoint,
# ml_collections, webdataset (and braceexpand), orjson, soundfile (cffi, pycparser), soxr, librosa (audioread,
# decorator, pooch, platformdirs) and espeakng-loader go on PYTHONPATH as wheels first; its JAX, Flax and optax serve.
#
# Without names it runs the first three (~5 min on an H100, most of it compilation). restart_1p3b (bench/restart.py:
# a cold launch, a SIGTERM save of the 15.6 GB state, two warm restarts, a cold one, two warm ones whose restore waits
# for the executable's load (train.restore_beside_compile=False), then the warm restart again under
# bench/stack_sampler.py, whose timeline it prints; ~4.5 min on an H200 with one warm restart and a warm new run in
# place of the other three, so about 5 min now, an estimate) and restore_1p3b
# (bench/restore.py: that state restored alone under train.ckpt_restore_gb 0, 8, 4 and 2, twice each, each in a fresh
# process; ~2.5 min) fit one call together: 6.8 min on an H200 on 2026-11-28, without the sampled launch and before
# restart_1p3b's repeats (about 7.5 min with them, an estimate).
# Each benchmark runs in its own process under a time limit, so one failure (say, out of memory) still leaves the
# others' figures; logs and the benchmarks' JSON lines land in OUT_DIR.
set -u
out=${1:?usage: bash bench/gpu_figures.sh OUT_DIR [NAME ...]}
shift
known="train_1p3b sampler_1p3b sampler_fish restart_1p3b restore_1p3b"
for name in "$@"; do
  [[ " $known " == *" $name "* ]] || { echo "unknown benchmark '$name'; known: $known" >&2; exit 2; }
done
wanted=${*:-train_1p3b sampler_1p3b sampler_fish}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
python=${PYTHON:-python3}

run() {  # run NAME SECONDS SCRIPT ARGS...: one benchmark, if wanted, its log in OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ " $wanted " == *" $name "* ]] || return 0
  echo "== $name: $*"
  # --kill-after: a benchmark that ignores the TERM (a trainer saving its checkpoint) is killed 20 s later.
  timeout --kill-after=20 "$limit" "$python" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -e '^WARNING' -e '^I0000' "$out/$name.log" | tail -n 12
  echo "== $name: exit $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())"
results="bench/results/train_step.jsonl bench/results/sampler.jsonl bench/results/restart.jsonl
bench/results/restore.jsonl"
# shellcheck disable=SC2086 # $results: a list of paths without spaces
results_before=$(cat $results 2>/dev/null | wc -l)
run train_1p3b 210 bench/train_step.py --configs echo_1p3b --batch_size 16 --steps 5 --warmup 2
run sampler_1p3b 140 bench/sampler.py --config echo_1p3b --frames 750 --steps 32 --modes independent --repeats 3
run sampler_fish 140 bench/sampler.py --config echo_base_fish --frames 640 --frame_rate 21.53 --steps 32 \
  --modes independent --repeats 3
run restart_1p3b 480 bench/restart.py --config echo_1p3b --set train.batch_size=16 --set data.streams=1 \
  --no_new_run --warm_repeats 2 \
  --restore_after_compile_too --profile
run restore_1p3b 300 bench/restore.py --config echo_1p3b --restore_gb 0,8,4,2 --repeats 2
for file in $results; do
  [[ -f $file ]] && cp "$file" "$out/"
done
echo "$results_before result lines before; now: $(cat "$out"/*.jsonl 2>/dev/null | wc -l)"
