#!/usr/bin/env bash
# qdpo against TRL on one GPU in one call (issue 10), for a device session.
# Prepare here: `bash ../shared/gpu/make_site.sh --with-trl` and `pip download --no-deps -d /tmp/w
# pytest pluggy iniconfig && pip install --no-deps --target .gpu-site /tmp/w/*.whl` (the GPU
# image has no pytest), then run on the device machine
# from the project root with `carry: [".gpu-site"]`:   BUDGET=540 bash tests/gpu_bench.sh
# Protocol of ../shared/gpu/README.md's TRL table: QLoRA NF4 + double quant, bf16, LoRA r=16
# alpha=32 dropout 0 on all linear layers, gradient checkpointing, paged 8-bit AdamW, 8 pairs per
# optimizer step (TRL: 2 per micro-batch x 4), 8 steps (the first 2 not timed), prompt 128-512 +
# responses 64-512 tokens; `qdpo bench --against trl` runs both sides in one process.
# Each piece has its own time limit and the whole script a deadline (BUDGET seconds), most
# important pieces first. Few files come back from a device call, so every piece appends to
# $OUT/all.log and its rows to $OUT/rows.jsonl. Without CUDA it runs a smoke version on the
# quickstart model, to check the script itself. A second call can run what the first had no
# time for: ONLY="8b-ab 1b-vs-trl" BUDGET=... bash tests/gpu_bench.sh
set -uo pipefail
export PYTHONPATH="$PWD/.gpu-site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-/tmp/qdpo-bench}"
BUDGET="${BUDGET:-520}"
mkdir -p "$OUT"
START=$(date +%s)
if python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  R=recipes/llama31-8b-ultrafeedback.yaml; SMALL=(--shape llama-3.2-1b); BIG=(--shape llama-3.1-8b)
  STEPS=8; WARM=2; LONG_P=2048-4096; LONG_R=1024-4096; HUGE_P=8192-8192; HUGE_R=4096-4096
  MATCH=(--match-memory)  # TRL's peak is measured only on CUDA
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/all.log"
else
  R=recipes/quickstart.yaml; SMALL=(); BIG=(); STEPS=3; WARM=1
  LONG_P=64-96; LONG_R=32-64; HUGE_P=100-100; HUGE_R=50-50; MATCH=()
  echo "no CUDA: smoke run on the quickstart model" | tee "$OUT/all.log"
fi
COMMON=(train.pairs_per_step=8 train.micro_batch_pairs=2 lora.r=16 lora.alpha=32 lora.dropout=0
        lora.target_modules=all-linear model.double_quant=true train.optimizer=paged_adamw_8bit
        --steps "$STEPS" --warmup "$WARM")
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
piece() {  # name, limit seconds, command...   (ONLY="a b": run only the pieces named)
  local name=$1 limit=$2; shift 2
  LAST_RC=skipped
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return
  local l; l=$(left)
  (( l < 30 )) && { echo "== $name: skipped (deadline)" | tee -a "$OUT/all.log"; return; }
  (( limit > l )) && limit=$l
  echo "== $name (limit ${limit}s, $(left)s left)" | tee -a "$OUT/all.log"
  local t0; t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$OUT/piece.log" 2>&1
  local rc=$?
  LAST_RC=$rc
  grep -v USDT "$OUT/piece.log" >> "$OUT/all.log"
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/all.log"
  (( rc != 0 )) && grep -v USDT "$OUT/piece.log" | tail -n 12
}
qbench() {  # name, limit, bench arguments... (rows tagged with the piece's name)
  local name=$1 limit=$2; shift 2
  piece "$name" "$limit" python3 -m qdpo bench "$R" "${COMMON[@]}" "$@" --json "$OUT/piece.json"
  [[ -f $OUT/piece.json ]] && python3 -c "import json,sys; [print(json.dumps(dict(r, piece=sys.argv[1]))) for r in json.load(open(sys.argv[2]))]" "$name" "$OUT/piece.json" >> "$OUT/rows.jsonl"
  rm -f "$OUT/piece.json"
}
python3 -c 'import torch, transformers, peft, bitsandbytes, trl; print("torch", torch.__version__,
"transformers", transformers.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__,
"trl", trl.__version__)' 2>&1 | tee -a "$OUT/all.log"

ab() {  # name, limit, shape args..., --, variants...: settings A/B on one model build
  local name=$1 limit=$2; shift 2
  local shape=(); while [[ $1 != -- ]]; do shape+=("$1"); shift; done; shift
  piece "$name" "$limit" python3 tests/gpu_ab.py "$R" "${shape[@]}" --out "$OUT/rows.jsonl" \
    --steps "$STEPS" --warmup "$WARM" --common "${COMMON[*]:0:8} train.max_tokens=8192" "$@"
}

# Memory levers of the headline: layer inputs in pinned host memory, the embedding table too
LEAN=(model.offload_activations=true model.embeddings_on_host=true)

# 1. the issue's headline, both targets at once: both tools in one process on the 8B shape,
#    qdpo on the token budget the planner keeps within TRL's just-measured peak
#    (--match-memory). If the host table fails, again with offload alone.
qbench 8b-vs-trl 200 "${BIG[@]}" "${LEAN[@]}" --against trl "${MATCH[@]}" \
    --profile "$OUT/prof-8b"
[[ $LAST_RC == 0 || $LAST_RC == skipped ]] || \
  qbench 8b-vs-trl-off 170 "${BIG[@]}" model.offload_activations=true --against trl "${MATCH[@]}"
cat "$OUT"/prof-8b/*/profile.txt 2>/dev/null | head -24 >> "$OUT/all.log"
# 2. long pairs (TRL's long protocol: 1 pair per micro-batch) within TRL's memory
qbench 8b-long 150 "${BIG[@]}" "${LEAN[@]}" train.pairs_per_step=2 train.micro_batch_pairs=1 \
    --prompt-len "$LONG_P" --response-len "$LONG_R" --steps 3 --warmup 1 --against trl \
    "${MATCH[@]}"
# 3. the CUDA-only tests (paged 8-bit AdamW, fp16 with scaling, FlexAttention, the OOM
#    message, offload, the host table, no GPU waits in a step); pytest comes in .gpu-site
piece test-gpu 180 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider
# 4. the levers one by one on one 8B build (plan GiB beside each peak): a 1k budget (the
#    planner's check), the default 8k budget,
#    offload alone, the host table alone, both at 4k and 6k, compiled layers (compiled stays
#    compiled, so last)
[[ -n ${SKIP_AB:-} ]] || ab 8b-ab 200 "${BIG[@]}" -- \
  plan1k:steps=3,train.max_tokens=1024 \
  8k off4k:model.offload_activations=true,train.max_tokens=4096 \
  host8k:model.embeddings_on_host=true \
  both4k:model.embeddings_on_host=true,model.offload_activations=true,train.max_tokens=4096 \
  both6k:model.embeddings_on_host=true,model.offload_activations=true,train.max_tokens=6144 \
  "comp-both4k:compile=1,model.embeddings_on_host=true,model.offload_activations=true,train.max_tokens=4096"
# 5. the 1B shape within TRL's memory (its head shares the table: offload only)
qbench 1b-vs-trl 100 "${SMALL[@]}" model.offload_activations=true --against trl "${MATCH[@]}"
# 6. the planner against the 1B shape at 1k and 8k tokens (the issue's check; 8B is in 4.)
ab 1b-plan 90 "${SMALL[@]}" -- "1b-1k:steps=3,train.max_tokens=1024" \
  "1b-8k:steps=3,train.max_tokens=8192"
# 7. one 16k-token pair (measured at 14.33 GiB before: within 22 GiB)
qbench 8b-16k 100 "${BIG[@]}" "${LEAN[@]}" train.pairs_per_step=1 train.micro_batch_pairs=1 \
    train.max_tokens=16384 --prompt-len "$HUGE_P" --response-len "$HUGE_R" --steps 3 --warmup 1

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()] \
    if (out / "rows.jsonl").exists() else []
print(f"{'piece':10} {'tool':10} {'layout':13} {'ref':10} {'attn':14} {'tok/s':>8} {'e2e':>8} "
      f"{'step s':>6} {'alloc':>6} {'plan':>6} {'resv':>6} {'MFU':>6} {'pad':>4} {'tokens':>6}")
for r in rows:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    x = r["extra"]
    print(f"{r['piece']:10} {x.get('tool', 'qdpo'):10} {r['layout']:13} "
          f"{r['reference']:10} {x.get('attn', ''):14} {r['tokens_per_s']:8,.0f} "
          f"{r['e2e_tokens_per_s']:8,.0f} {r['step_time_s']:6.2f} {r['peak_alloc_gib'] or 0:6.2f} "
          f"{x.get('plan_peak_gib') or 0:6.2f} {r['peak_reserved_gib'] or 0:6.2f} {mfu:>6} "
          f"{r['padding_fraction']:4.0%} {x.get('max_tokens') or 0:6}")
PY
grep -E "against trl|match-memory" "$OUT/all.log"
echo "total $(( $(date +%s) - START ))s"
