#!/usr/bin/env bash
# The device check of the GPU issues, prepared for a lent GPU machine. Parts (the first argument):
#   bench    benchmarks/gpu_speed.py: the compiled trainer step of ViT-B-16 and ViT-L-16 at every strategy and length
#            with the batch rule at batch 1024, open_clip_train beside it (the issue's targets; 313 s on one H100);
#   train    `sweep train grids/gpu_check.yaml` on the embedded data in memory (ViT-B-16, 224 px, random 17 tokens),
#            then `files`;
#   files    the same run on webdataset shards of 256-px JPEGs (`sweep make-data`), with the JPEGs decoded by the
#            loader workers and on the GPU (`decode: device`), benchmarks/decode_speed.py beside it;
#   explore  gpu_speed at batch 4096 (ViT-B-16 at 50 and 17 tokens, ViT-L-16 random and resize at 17): do bigger
#            micro-batches lift the short lengths? (at most 6.5 minutes);
#   whole    ViT-B-16 at 17 tokens with the encoders compiled whole instead of per block;
#   all      bench, then train.
# Outputs go to $OUT (or ./gpu_check_out): gpu_speed.{txt,jsonl}, gpu_speed_4096.{txt,jsonl}, train_memory.json,
# train_files.json, train_files_device.json, gpu_speed_whole.txt, log.txt. Results so far: benchmarks/README.md.
#
# The machine has torch but not this project's other dependencies, and nothing can be fetched there: carry them
# as wheels. Once, here (where pip reaches PyPI), in the repo root:
#     echo /.whl/ >> .git/info/exclude; bash scripts/gpu_check.sh wheels
# then run with the device tool, carry [".whl"]. Bench ran once (2026-11-27), so the next session's plan (15 minutes
# of device time, the machine's start included) is: `bash scripts/gpu_check.sh train` with timeout_s 330, then
# `bash scripts/gpu_check.sh explore` with timeout_s 410 on the still-warm machine. Every part has its own time
# limit and leaves what it measured in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
  mkdir -p .whl
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 simplejpeg==1.9.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
fi

part=${1:-all}
out=${OUT:-gpu_check_out}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
tick() { echo "[$(date +%T)] $*"; }

summarize() {  # gpu_speed.py --json rows ($1) -> the table, the profiles and the checks
  python3 - "$1" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from gpu_speed import checks, print_table
rows = [json.loads(line) for line in open(sys.argv[1])]
cells, comparisons = [r for r in rows if "strategy" in r], [r for r in rows if "ours_over_open_clip" in r]
print_table(cells, comparisons)
for r in rows:
    if "profiled" in r:
        print(f"profile {r['model']} {r['profiled']} batch {r.get('batch')}: {r['ms_per_step']} ms per step, "
              f"GPU busy {r.get('gpu_busy')}; "
              f"ms per step {r.get('phase_ms')}; forward TFLOP/s {r.get('forward_tflops')}")
for ok, detail in checks(cells, comparisons):
    print("PASS" if ok else "FAIL", detail)
PY
}

if [ "$part" = all ] || [ "$part" = bench ]; then
  # one model per process and time limit, so that an overrun of one leaves the other's rows
  tick "gpu_speed: ViT-B-16, with open_clip_train beside it"
  timeout 220 python3 benchmarks/gpu_speed.py --models ViT-B-16 --profile --json > "$out/gpu_speed.jsonl"
  tick "gpu_speed: ViT-L-16"
  timeout 200 python3 benchmarks/gpu_speed.py --models ViT-L-16 --no-open-clip --profile --json \
    >> "$out/gpu_speed.jsonl"
  summarize "$out/gpu_speed.jsonl" > "$out/gpu_speed.txt"
  cat "$out/gpu_speed.txt"
fi

if [ "$part" = explore ]; then
  # Does a larger global batch lift the short lengths? At batch 1024, 17 tokens delivered 176-209 TFLOP/s against
  # 329 at full length (ViT-B-16). A study's batch is far larger (the paper's 32,768): under the batch rule the short
  # lengths then run big micro-batches (GEMMs as large as full length's) and full length accumulates. Batch 4096,
  # long steps timed fewer times (--seconds); the rows and checks are to set against bench's at 1024.
  tick "gpu_speed: ViT-B-16 at batch 4096, 50 and 17 tokens, profiled"
  timeout 180 python3 benchmarks/gpu_speed.py --models ViT-B-16 --batch 4096 --seconds 6 --tokens 50 17 \
    --no-open-clip --profile --json > "$out/gpu_speed_4096.jsonl"
  tick "gpu_speed: ViT-L-16 at batch 4096, random and resize at 17 tokens"
  timeout 200 python3 benchmarks/gpu_speed.py --models ViT-L-16 --batch 4096 --seconds 6 --tokens 17 \
    --strategies random resize --no-open-clip --json >> "$out/gpu_speed_4096.jsonl"
  summarize "$out/gpu_speed_4096.jsonl" > "$out/gpu_speed_4096.txt"
  cat "$out/gpu_speed_4096.txt"
fi

if [ "$part" = whole ]; then
  # does compiling the encoders whole (one graph per shape, not one per block) lift ViT-B-16 at 17 tokens? Set it
  # against bench's blocks rows of the same machine
  tick "gpu_speed: ViT-B-16 full length and random 17, the encoders compiled whole, profiled"
  timeout 240 python3 benchmarks/gpu_speed.py --models ViT-B-16 --tokens 17 --strategies random --compile whole \
    --no-open-clip --profile | tee "$out/gpu_speed_whole.txt"
fi

runs=$(mktemp -d)
if [ "$part" = all ] || [ "$part" = train ]; then
  tick "sweep train on the embedded data in memory"
  timeout 120 python3 -m sweep train grids/gpu_check.yaml --out "$runs/memory" --quiet
  cp "$runs/memory/result.json" "$out/train_memory.json"
fi

if [ "$part" = all ] || [ "$part" = train ] || [ "$part" = files ]; then
  # 256 shards of 64: enough for the loader's 240 streams (sweep/data/stream.py), as a real dataset's shards are
  tick "sweep make-data: 16,384 training pairs as 256-px JPEG shards"
  timeout 90 python3 -m sweep make-data "$runs/data" --image-size 256 --train-samples 16384 --shard-size 64 \
    --zeroshot-samples 40 --retrieval-images 10
  shards="$runs/data/shards/train-{00000..00255}.tar"
  tick "decode_speed: decoding in the loader workers against on the GPU (worker, trainer, loader alone)"
  timeout 100 python3 benchmarks/decode_speed.py --sizes 224 64 --seconds 2
  tick "sweep train on the shards"
  timeout 120 python3 -m sweep train grids/gpu_check.yaml --out "$runs/files" --quiet --set dataset=webdataset \
    --set "train_data=$shards"
  cp "$runs/files/result.json" "$out/train_files.json"
  tick "sweep train on the shards, JPEGs decoded on the GPU (decode: device)"
  timeout 120 python3 -m sweep train grids/gpu_check.yaml --out "$runs/files_device" --quiet \
    --set dataset=webdataset --set "train_data=$shards" --set decode=device
  cp "$runs/files_device/result.json" "$out/train_files_device.json"
  python3 - "$out" <<'PY'
import json, sys
for name in ("memory", "files", "files_device"):
    try:
        r = json.load(open(f"{sys.argv[1]}/train_{name}.json"))
    except FileNotFoundError:
        continue
    c, batch = r["compute"], r["config"]["batch_size"]
    pre = c["stages"]["pretrain"]  # random 17 tokens: set its steady rate against gpu_speed's random 17 row
    steady = (pre["samples"] - batch) / (pre["train_seconds"] - pre["first_step_seconds"])
    print(f"{name}: {r['status']}; pre-training {steady:.0f} samples/s after its first step "
          f"({pre['first_step_seconds']:.1f} s), {c['samples_per_second']} over both stages with every first step; "
          f"workers {c.get('workers')}, decode {r['config'].get('decode')}, {c['device']} {c['precision']} "
          f"compiled {c['compiled']}, "
          f"micro-batches {pre['micro_batch_size']} / {c['stages']['finetune']['micro_batch_size']}; "
          f"fine-tuned i2t_r1 {r['metrics']['finetune']['i2t_r1']:.1f}")
PY
fi
tick done
