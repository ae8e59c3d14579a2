#!/usr/bin/env bash
# The GPU check in one command (issue #18): decode speed of dense and
# stability-guided decoding on a Llama-3-8B-shaped model with RANDOM weights in
# the real shapes (bfloat16), each against the same run's bandwidth probe and
# its bytes bound, selection + gather against the prefill (the token-wise
# top-m by bisection and by lax.top_k, interleaved), and the memory-limit case
# (sparsified FFNs in host memory, a device budget below the model's size)
# against transformers offloaded by accelerate to the same budget, with the
# core rows gathered on the device and on the host; and the lossless mode's
# cost (issue #19): its dense verify of N + 1 tokens and its drafts in dense
# decode steps (random weights: the acceptance itself means nothing). Writes
# $OUT/device_check.json (one JSON of every run) and a log per run.
#
#   scripts/device_check.sh                       # on the GPU machine
#   DEVICE_CHECK_CPU=1 SHAPE=smollm2-135m NUM_LAYERS=2 DTYPE=float32 BUDGET_GB=0.2 \
#       ROUNDS=1 STEPS=2 PROMPT_LEN=16 CACHE_LEN=64 scripts/device_check.sh   # a dry run on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device_check}
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-llama3-8b}
DTYPE=${DTYPE:-bfloat16}
BUDGET_GB=${BUDGET_GB:-12}      # the device budget of the memory-limit run (the paper's 12 GB GPU)
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-64}
PROMPT_LEN=${PROMPT_LEN:-256}
CACHE_LEN=${CACHE_LEN:-1024}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The CUDA build of JAX: the GPU image holds it; elsewhere install the extra.
if ! "$PY" -c "import jax, flax, chex" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[cuda]"
fi
"$PY" - <<'EOF'
import os, jax
backend = jax.default_backend()
print(f"[devices: {jax.devices()}; backend {backend}; jax {jax.__version__}]")
if backend != "gpu" and not os.environ.get("DEVICE_CHECK_CPU"):
  raise SystemExit(f"error: no GPU visible to JAX (backend {backend}); DEVICE_CHECK_CPU=1 runs on CPU")
EOF

layers=()
if [[ -n "${NUM_LAYERS:-}" ]]; then layers=(--num_layers="$NUM_LAYERS"); fi
bench() {   # bench NAME FLAGS...: one benchmark run, its JSON and log under $OUT
  local name=$1; shift
  "$PY" scripts/benchmark.py --shape="$SHAPE" "${layers[@]}" --dtype="$DTYPE" \
      --prompt_len="$PROMPT_LEN" --cache_len="$CACHE_LEN" --decode_steps="$STEPS" \
      --rounds="$ROUNDS" --json_out="$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}
bench paper_layers --methods=dense,stability --betas=0.4,0.2 --sparse_layers=paper
bench all_layers --methods=dense,stability --betas=0.4,0.2 --sparse_layers=all \
    --top_ms=bisection,top_k
bench offload --methods=stability --betas=0.4,0.2 --sparse_layers=all --offload_modes=device,host \
    --device_memory_limit_gb="$BUDGET_GB" --compare_hf_offload
bench lossless --methods=dense,stability --betas=0.4 --sparse_layers=all --verifies=0,2,4

"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
runs = {name: json.load(open(os.path.join(out, name + ".json")))
        for name in ("paper_layers", "all_layers", "offload", "lossless")}
json.dump(runs, open(os.path.join(out, "device_check.json"), "w"), indent=1)
for name, run in runs.items():
  for r in run["runs"]:
    print(f"{name}: {r['method']} beta={r['beta']} top-m {r['core'] and r['core']['top_m']} "
          f"offload {r['offload']} "
          f"{r['decode_tokens_per_second']:.1f} tokens/s, {r['fraction_of_limit']} of the limit, "
          f"{r['fraction_of_bound']} of the bytes bound, select {r['select_seconds']} s, "
          f"gather {r['gather_seconds']} s, vs transformers offloaded {r['speedup_vs_hf_offload']}, "
          f"memory {r['memory']}")
select = {}   # the faster top-m algorithm, by the median select time at each beta
for r in runs["all_layers"]["runs"]:
  if r["core"] and r["select_seconds"] is not None:
    select.setdefault(r["beta"], {})[r["core"]["top_m"]] = r["select_seconds"]
for beta, times in select.items():
  verdict = (f"{min(times, key=times.get)} faster" if len(times) == 2
             else "not measurable for both (below the prefill's noise)")
  print(f"top-m at beta={beta}: {verdict} ({times})")
gathers = {(r["beta"], r["offload"]): r["gather_seconds"] for r in runs["offload"]["runs"]}
print(f"offloaded gather seconds by (beta, side), interleaved: {gathers}")
for name in ("all_layers", "offload"):   # offloaded: each layer's FFN copy freed, or all live?
  print(f"{name}: the prefill's memory {runs[name]['runs'][1]['prefill_memory']}")
print(f"transformers offloaded: {runs['offload']['hf_offload_decode_tokens_per_second']} tokens/s, "
      f"modules {runs['offload']['hf_offload_modules']}")
lossless = runs["lossless"]
dense = next(r for r in lossless["runs"] if r["method"] == "dense")
dense_step = 1 / dense["decode_tokens_per_second"]
for r in lossless["runs"]:   # per round: N drafts, one verify; tokens = steps x rounds
  if r["verify"]:
    verifies = lossless["decode_steps"] * lossless["rounds"] / (r["mean_accepted_per_verify"] + 1)
    verify, draft = r["verify_seconds"] / verifies, r["draft_seconds"] / verifies / r["verify"]
    print(f"lossless N={r['verify']}: a verify costs {verify / dense_step:.2f} dense steps, "
          f"a draft {draft / dense_step:.2f}")
print(f"[wrote {os.path.join(out, 'device_check.json')}]")
EOF
