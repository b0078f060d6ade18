#!/usr/bin/env bash
# The GPU benchmark of issue 3, as one script for a device session (see ../shared/gpu/README.md).
# From the project root on the GPU machine, after `bash ../shared/gpu/make_site.sh` here and
# `carry: [".gpu-site"]`:   bash tests/gpu_bench.sh
# Same protocol as the TRL reference table: QLoRA NF4 + double quant, bf16, LoRA r=16 alpha=32
# dropout 0 on all linear layers, gradient checkpointing, paged 8-bit AdamW, 8 pairs per step,
# 8 steps (the first 2 not timed), prompt 128-512 + responses 64-512 tokens.
set -uo pipefail
export PYTHONPATH="$PWD/.gpu-site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/qdpo-bench}"
mkdir -p "$OUT"
R=recipes/llama31-8b-ultrafeedback.yaml
COMMON=(train.pairs_per_step=8 train.micro_batch_pairs=2 lora.r=16 lora.alpha=32 lora.dropout=0
        train.optimizer=paged_adamw_8bit --steps 8 --warmup 2)
run() {  # name, then arguments
  local name=$1; shift
  echo "== $name"
  timeout 900 python3 -m qdpo bench "$R" "${COMMON[@]}" "$@" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1 || echo "   failed: see $OUT/$name.log"
  tail -n 6 "$OUT/$name.log"
}
run 1b --shape llama-3.2-1b --prompt-len 128-512 --response-len 64-512 \
    train.max_tokens=8192 --layouts padded,shared_prefix
run 8b --shape llama-3.1-8b --prompt-len 128-512 --response-len 64-512 \
    train.max_tokens=8192 --layouts padded,shared_prefix
run 8b-long --shape llama-3.1-8b --prompt-len 2048-4096 --response-len 1024-4096 \
    train.max_tokens=16384 --layouts shared_prefix
python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    rows += [(f.stem, r) for r in json.loads(f.read_text())]
print(f"{'run':8} {'layout':14} {'ref':10} {'tok/s':>8} {'e2e':>8} {'alloc':>6} {'resv':>6} {'MFU':>6}")
for name, r in rows:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    print(f"{name:8} {r['layout']:14} {r['reference']:10} {r['tokens_per_s']:8,.0f} "
          f"{r['e2e_tokens_per_s']:8,.0f} {r['peak_alloc_gib'] or 0:6.2f} "
          f"{r['peak_reserved_gib'] or 0:6.2f} {mfu:>6}")
PY
