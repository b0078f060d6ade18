#!/usr/bin/env bash
# qdpo against TRL on the same GPU in the same call (issue 10), for a device session.
# Prepare here: `bash ../shared/gpu/make_site.sh --with-trl`, then run on the device machine
# from the project root with `carry: [".gpu-site"]`:   bash tests/gpu_bench.sh
# Protocol of ../shared/gpu/README.md's TRL table: QLoRA NF4 + double quant, bf16, LoRA r=16
# alpha=32 dropout 0 on all linear layers, gradient checkpointing, paged 8-bit AdamW, 8 pairs per
# optimizer step, 8 steps (the first 2 not timed), prompt 128-512 + responses 64-512 tokens.
# Each piece has its own time limit and the whole script a deadline (BUDGET seconds), most
# important pieces first, so one failure or a slow start still leaves figures. Without CUDA it
# runs a smoke version on the quickstart model (SMOKE), to check the script itself.
set -uo pipefail
export PYTHONPATH="$PWD/.gpu-site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/qdpo-bench}"
BUDGET="${BUDGET:-520}"
mkdir -p "$OUT"
START=$(date +%s)
if python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  R=recipes/llama31-8b-ultrafeedback.yaml; SMALL=(--shape llama-3.2-1b); BIG=(--shape llama-3.1-8b)
  TRL_SMALL=llama1b; TRL_BIG=llama8b; STEPS=8; WARM=2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
else
  R=recipes/quickstart.yaml; SMALL=(); BIG=(); TRL_SMALL=tiny; TRL_BIG=tiny; STEPS=3; WARM=1
  echo "no CUDA: smoke run on the quickstart model" | tee "$OUT/gpu.txt"
fi
COMMON=(train.pairs_per_step=8 train.micro_batch_pairs=2 lora.r=16 lora.alpha=32 lora.dropout=0
        lora.target_modules=all-linear model.double_quant=true train.optimizer=paged_adamw_8bit
        --steps "$STEPS" --warmup "$WARM")
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
piece() {  # name, limit seconds, command...
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  (( l < 30 )) && { echo "== $name: skipped (deadline)"; return; }
  (( limit > l )) && limit=$l
  echo "== $name (limit ${limit}s, $(left)s left)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"
  (( rc != 0 )) && tail -n 15 "$OUT/$name.log"
}
qbench() {  # name, limit, bench arguments...
  local name=$1 limit=$2; shift 2
  piece "$name" "$limit" python3 -m qdpo bench "$R" "${COMMON[@]}" "$@" --json "$OUT/q-$name.json"
}
python3 -c 'import torch, transformers, peft, bitsandbytes, trl; print("torch", torch.__version__,
"transformers", transformers.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__,
"trl", trl.__version__)' 2>&1 | tee "$OUT/versions.txt"

# 1. why FlexAttention stalled last time (stacks dumped if a stage hangs)
piece flex-probe 70 python3 tests/gpu_flex_probe.py 55
FLEX_OK=$(grep -c "all stages passed" "$OUT/flex-probe.log")
if [[ $FLEX_OK == 0 ]]; then
  piece flex-probe-1thread 60 env TORCHINDUCTOR_COMPILE_THREADS=1 python3 tests/gpu_flex_probe.py 45
  FLEX_OK=$(grep -c "all stages passed" "$OUT/flex-probe-1thread.log")
fi
# 2. where a step's time goes (profiles), with the allocator's expandable segments (new default)
qbench 1b-sdpa 120 "${SMALL[@]}" train.max_tokens=8192 --layouts shared_prefix \
    --profile "$OUT/prof-1b"
piece trl-1b 120 python3 .gpu-site/bin/trl_anchor.py "$TRL_SMALL" "$OUT/trl.jsonl" --steps "$STEPS"
qbench 8b-sdpa 150 "${BIG[@]}" train.max_tokens=8192 --layouts shared_prefix \
    --profile "$OUT/prof-8b"
# 3. FlexAttention with rows bucketed to 128 tokens, if the probe compiled
if [[ $FLEX_OK != 0 ]]; then
  qbench 1b-flex 100 "${SMALL[@]}" train.max_tokens=8192 model.attn_implementation=flex_attention \
      --layouts shared_prefix --profile "$OUT/prof-1b-flex"
fi
# 4. the reference online instead of precomputed (end-to-end), and memory at 1k tokens (plan)
qbench 1b-online 80 "${SMALL[@]}" train.max_tokens=8192 train.reference=online \
    --layouts shared_prefix
qbench 8b-1k 100 "${BIG[@]}" train.max_tokens=1024 --layouts shared_prefix
piece trl-8b 200 python3 .gpu-site/bin/trl_anchor.py "$TRL_BIG" "$OUT/trl.jsonl" --steps "$STEPS"
for d in "$OUT"/prof-*/*/; do [[ -f $d/profile.txt ]] && { echo "== $d"; head -n 16 "$d/profile.txt" | cut -c1-110; }; done

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':10} {'layout':14} {'ref':10} {'attn':15} {'tok/s':>8} {'e2e':>8} {'step s':>7} "
      f"{'alloc':>6} {'resv':>6} {'MFU':>6} {'pad':>5}")
for f in sorted(out.glob("q-*.json")):
    for r in json.loads(f.read_text()):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{f.stem[2:]:10} {r['layout']:14} {r['reference']:10} {r['extra']['attn']:15} "
              f"{r['tokens_per_s']:8,.0f} {r['e2e_tokens_per_s']:8,.0f} {r['step_time_s']:7.2f} "
              f"{r['peak_alloc_gib'] or 0:6.2f} {r['peak_reserved_gib'] or 0:6.2f} {mfu:>6} "
              f"{r['padding_fraction']:5.0%}")
trl = out / "trl.jsonl"
for line in (trl.read_text().splitlines() if trl.exists() else []):
    r = json.loads(line)
    print(f"{'trl-' + r['arch']:10} {'padded':14} {'online':10} {'sdpa':15} "
          f"{r['tokens_per_s']:8,.0f} {r['tokens_total'] / r['train_s']:8,.0f} {r['step_s_median']:7.2f} "
          f"{r['peak_alloc_gib'] or 0:6.2f} {r['peak_reserved_gib'] or 0:6.2f}")
PY
echo "total $(( $(date +%s) - START ))s"
