"""Time several settings on one model build, for a GPU session's A/B of speed levers.

    python3 tests/gpu_ab.py RECIPE --shape llama-3.1-8b --out rows.jsonl \\
        --common "train.pairs_per_step=8 lora.r=16" base "peft:lean=0" "mt4k:train.max_tokens=4096"

Each variant is NAME[:SETTING,SETTING...], a setting being a recipe override or one of
`lean=0` (peft's own LoRA forward), `profile=DIR` (profile the last step, print its
table), `compile=1` (torch.compile each decoder layer from then on), `host_embed=1` (the
input embedding table to host memory from then on, as `model.embeddings_on_host: true` does;
a variant whose recipe sets that key gets the same), `steps=N` (this variant's step count,
for slow settings).
The model is built once (random weights, quantized as the recipe says) from the first
variant's recipe, so variants must not change the model or the LoRA shape (each variant's
`model.offload_activations` is applied to the build; `train.compile` needs `compile=1`);
put the variants with the table on the host last (it does not come back to the GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shlex
from pathlib import Path

from qdpo.bench import _bench_model, run_bench
from qdpo.device import default_device
from qdpo.lora_forward import use_lean_lora
from qdpo.offload import (embeddings_stay_because, embeddings_to_host, host_embedding,
                          use_offloaded_checkpointing)
from qdpo.recipe import load_recipe

SPECIAL = ("lean", "profile", "compile", "host_embed", "steps")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", type=Path)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--common", default="")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    common = shlex.split(a.common)
    built = None
    for spec in a.variants:
        name, _, rest = spec.partition(":")
        settings = [s for s in rest.split(",") if s]
        special = dict(s.split("=", 1) for s in settings if s.split("=")[0] in SPECIAL)
        overrides = [s for s in settings if s.split("=")[0] not in special]
        recipe = load_recipe(a.recipe, common + overrides)
        if built is None:
            built = _bench_model(recipe, a.shape, True, default_device())
        use_lean_lora(built[0], special.get("lean", "1") != "0")
        # model.offload_activations follows each variant's recipe on the one build
        use_offloaded_checkpointing(built[0], recipe.model.offload_activations)
        if recipe.train.compile and special.get("compile") != "1":
            print("   train.compile in a variant's recipe does nothing here: use compile=1",
                  flush=True)
        if special.get("compile") == "1":  # every decoder layer, one graph for all of them
            for layer in built[0].get_base_model().model.layers:
                layer.compile(dynamic=True)
        if special.get("host_embed") == "1" or recipe.model.embeddings_on_host:
            if not embeddings_to_host(built[0]):
                why = embeddings_stay_because(built[0]) or "the decoder does not use it"
                print(f"   host_embed: no effect, {why}", flush=True)
        profile = Path(special["profile"]) if "profile" in special else None
        on_host = int(host_embedding(built[0]) is not None)
        print(f"== variant {name}: {' '.join(overrides) or '(recipe)'} "
              f"lean={special.get('lean', '1')} host_embed={on_host} "
              f"offload={int(recipe.model.offload_activations)}", flush=True)
        try:
            steps = int(special.get("steps", a.steps))
            r = run_bench(recipe, steps=steps, warmup=min(a.warmup, steps - 1), shape=a.shape,
                          profile=profile, built=built)
        except Exception as e:  # one failing variant must not cost the others
            print(f"   {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            gc.collect()
            continue
        row = dict(dataclasses.asdict(r), piece=name)
        print(f"   {name}: {r.tokens_per_s:,.0f} tok/s steady, {r.e2e_tokens_per_s:,.0f} e2e, "
              f"step {r.step_time_s:.2f} s, ref {r.reference_s:.1f} s, alloc "
              f"{r.peak_alloc_gib or 0:.2f} GiB, resv {r.peak_reserved_gib or 0:.2f}", flush=True)
        if profile and (profile / "profile.txt").exists():
            print((profile / "profile.txt").read_text()[:2500], flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        gc.collect()


if __name__ == "__main__":
    main()
