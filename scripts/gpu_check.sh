#!/usr/bin/env bash
# One-GPU check of the scaling work (issue #22): images/s, peak memory and MFU, in under 10 minutes on an
# H100-class GPU. Run from the repository root with the project's environment:
#
#     bash scripts/gpu_check.sh            # prints the tables; everything also goes to gpu_check.log
#     BATCH=128 STEPS=5 bash scripts/gpu_check.sh   # a smaller GPU (BATCH is MAE's; 448 px runs use BATCH/4)
#
# 1. MAE ViT-B/16 (conf/imagenet `mae`) bf16 at batch 256, eager against torch.compile, and under FSDP2
#    (fully_shard per block, bf16 params / fp32 reduce) on this one GPU;
# 2. long-sequence MAE at 448 px (conf/coco `longseq_448`, ViT-B, L = 784) without, with selective and
#    with full activation checkpointing: images/s and peak memory;
# 3. LoMaR against MAE at 448 px (conf/imagenet `lomar_448`; `--against` puts MAE at LoMaR's size);
# 4. the data path: images/s per CPU core for full / crop-only / shard decode and nvJPEG on the GPU, and the
#    CPU cores this GPU needs at the compiled bf16 rate measured in 1.
# No data set is needed: training steps run on synthetic batches. MFU = 3 x forward FLOPs (fvcore MACs x 2)
# x images/s / the GPU's dense bf16 peak (maelab.train.metrics.PEAK_BF16_TFLOPS).
set -euo pipefail
cd "$(dirname "$0")/.."
MAELAB=${MAELAB:-$( [ -x .venv/bin/maelab ] && echo .venv/bin/maelab || echo maelab )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BATCH=${BATCH:-256}
STEPS=${STEPS:-10}
LONG_BATCH=$(( BATCH / 4 ))
LOG=${LOG:-gpu_check.log}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export KEDRO_DISABLE_TELEMETRY=1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script needs one GPU')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$LOG"

run() {  # name, timeout seconds, maelab arguments...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  if ! timeout "$limit" "$MAELAB" "$@" --json > "$OUT/$name.json" 2>> "$LOG"; then
    echo "   $name failed or ran over ${limit}s (see $LOG)" | tee -a "$LOG"
    echo '{}' > "$OUT/$name.json"
  fi
}

run mae_b16 240 bench train --recipe mae --env imagenet --batch-size "$BATCH" --steps "$STEPS" \
  --precision bf16,bf16+compile,bf16+fsdp
run longseq_448 150 bench train --recipe longseq_448 --env coco --batch-size "$LONG_BATCH" --steps 5 \
  --precision bf16,bf16+ac=selective,bf16+ac=full
run lomar_vs_mae_448 120 bench train --recipe lomar_448 --env imagenet --against mae --batch-size "$LONG_BATCH" \
  --steps 5 --precision bf16
RATE=$("$PY" - "$OUT/mae_b16.json" <<'PYEOF'
import json, sys
runs = json.load(open(sys.argv[1])).get("results", [])
best = max((r["images_per_s"] for r in runs if r["precision"] in ("bf16+compile", "bf16")), default=8000.0)
print(f"{best:.0f}")
PYEOF
)
run data 90 bench data --images 128 --rounds 3 --rate "$RATE" --rate 8000

"$PY" - "$OUT" <<'PYEOF' | tee -a "$LOG"
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
def load(name):
    return json.loads((out / f"{name}.json").read_text() or "{}")

def table(title, run):
    if not run:
        print(f"\n{title}: no result"); return
    print(f"\n{title} (batch {run['batch_size']}, {run['device']})")
    print(f"{'variant':>22} {'img/s':>9} {'step ms':>9} {'1st step s':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for r in run["results"]:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        print(f"{r['precision']:>22} {r['images_per_s']:9.1f} {r['step_ms']:9.1f} {r.get('first_step_s', 0):10.1f}"
              f" {r['peak_mem_mb'] / 1024:9.2f} {r.get('tflops', 0):8.1f} {mfu:>6}")

table("MAE ViT-B/16 224 px", load("mae_b16"))
table("long-seq MAE ViT-B 448 px (L = 784)", load("longseq_448"))
both = load("lomar_vs_mae_448")
for run in both.get("runs", []):
    table(f"{run['recipe']} at {both['img_size']} px", run)
for precision, ratio in both.get("speedup", {}).items():
    print(f"LoMaR / MAE images/s at {both['img_size']} px, {precision}: {ratio:.2f}x")
data = load("data")
if data:
    print(f"\ndata path: {data['images']} JPEGs {data['source_hw'][1]}x{data['source_hw'][0]} -> {data['crop']} px")
    for path, ips in data["images_per_s_per_core"].items():
        cores = ", ".join(f"{c[path]:.1f} cores at {rate} img/s" for rate, c in data["cores_per_gpu"].items())
        print(f"{path:>12}: {ips:7.1f} img/s per core; {cores}")
    print(f"crop-only / full: {data['crop_over_full']:.2f}x")
    if "gpu_decode_images_per_s" in data:
        print(f"nvJPEG decode + crop + resize on the GPU: {data['gpu_decode_images_per_s']:.0f} img/s")
PYEOF
echo "full log: $LOG"
