"""Decode speed against the machine's bandwidth and against transformers.

  python scripts/benchmark.py --config=bench-smollm2 --compare_hf
  python scripts/benchmark.py --shape=tinyllama-1.1b --compare_hf --json_out=out.json
  python scripts/benchmark.py --config=bench-tinyllama --methods=dense,stability --betas=0.4,0.2 \
      --sparse_layers=all --compare_hf
  python scripts/benchmark.py --config=bench-smollm2 --methods=dense,stability,similarity \
      --cluster_dir=clusters/tqa

Measurements alternate (each method and β, then transformers) for --rounds
rounds and report medians, so that machine noise hits every side alike.
Sparse runs report `speedup_vs_dense`, `bound_speedup` (weight bytes read per
decode token, dense over sparse) and `fraction_of_bound`; their prefill time
includes core selection and the gather, and `select_gather_seconds` is that
extra (the selecting prefill minus a dense prefill of the same prompt, plus
the gather), measured in the same round. Similarity-guided runs select at the
clustering layer only and gather nothing once their cluster has been used.
"""

import os
import statistics

import numpy as np
from absl import flags

from coreinfer_jax.bench import reference, timing
from coreinfer_jax.cli import app, models, optional
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import methods
from coreinfer_jax.core.cost import decode_weight_bytes
from coreinfer_jax.core.spec import parse_beta
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
cli_flags.define_core_flags()
flags.DEFINE_list("methods", None, "methods to measure interleaved (default: --method)")
flags.DEFINE_list("betas", None, "uniform β values to measure for each sparse method (default: --beta)")
flags.DEFINE_string("shape", None, "a model shape in configs/shapes (random weights, real shape)")
flags.DEFINE_integer("num_layers", None, "with --shape: override the depth (to fit memory)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens (random ids)")
flags.DEFINE_integer("decode_steps", 64, "decode steps timed per round")
flags.DEFINE_integer("rounds", 3, "interleaved measurement rounds (medians reported)")
flags.DEFINE_boolean("compare_hf", False, "also time transformers (torch, same dtype and threads)")
flags.DEFINE_string("json_out", None, "write results as JSON here")
FLAGS = flags.FLAGS


def _variants(s, config, fingerprint):
  """(method, β flag value, CoreSpec or None, policy) for every run, checked
  before loading."""
  names = FLAGS.methods or [s["method"]]
  betas = FLAGS.betas or [s["beta"]]
  variants = []
  for method in names:
    for beta in (betas if method != "dense" else [None]):
      cluster_dir = s["cluster_dir"] if method == "similarity" else None
      policy = methods.policy_for(method, s, config, cluster_dir=cluster_dir,
                                  fingerprint=fingerprint, beta=beta)
      variants.append((method, beta, policy.spec, policy))
  return variants


def _median(rows, key):
  values = [r[key] for r in rows if r[key] is not None]
  return statistics.median(values) if values else None


def main(argv):
  del argv
  s = app.settings(["shape", "dtype", "cache_len", "prompt_len", "decode_steps", "rounds"]
                   + cli_flags.CORE_FLAGS)
  if s["decode_steps"] < 1 or s["rounds"] < 1 or s["prompt_len"] < 1:
    raise ValueError("--decode_steps, --rounds and --prompt_len must be at least 1")
  variants = _variants(s, models.model_config(FLAGS.model, s["shape"], FLAGS.configs_dir, FLAGS.num_layers),
                       models.model_fingerprint(FLAGS.model, s["shape"]))
  dtype = resolve_dtype(s["dtype"])
  dtype_name = np.dtype(dtype).name
  m, load_seconds = models.load(FLAGS.model, dtype, s["shape"], FLAGS.configs_dir, FLAGS.num_layers)
  if s["shape"]:
    print(f"[random weights in the shape of {s['shape']}"
          f"{f', {FLAGS.num_layers} layers' if FLAGS.num_layers else ''}]")
  dense_bytes = decode_weight_bytes(m.params)
  print(f"[loaded {m.path} in {load_seconds:.1f}s; {dense_bytes / 1e9:.3f} GB of weights read per "
        f"dense decode token]")

  probe = timing.probe_gb_per_s(min(dense_bytes, 1 << 30), dtype)
  print(f"probe: {probe:.1f} GB/s weight streaming")

  gens = [Generator(m.config, m.params, cache_len=s["cache_len"], policy=policy,
                    time_selection=True)
          for _, _, _, policy in variants]
  prompt = np.random.default_rng(0).integers(3, m.config.vocab_size, s["prompt_len"]).tolist()
  hf = None
  if FLAGS.compare_hf:
    import torch
    torch.set_num_threads(os.cpu_count())
    hf_config = models.shape_hf_config(FLAGS.configs_dir, s["shape"], FLAGS.num_layers) if s["shape"] else {}
    hf = reference.hf_model(m.path, hf_config, dtype_name)

  rows = [[] for _ in variants]   # per variant, one dict per round
  hf_rounds = []
  for r in range(s["rounds"]):
    line = []
    for (method, beta, core, _), gen, out in zip(variants, gens, rows):
      stats, tps = timing.time_prefill_and_decode(gen, [prompt], s["decode_steps"])
      out.append({"tps": tps, "prefill": stats.prefill_seconds, "gather": stats.gather_seconds,
                  "select": stats.select_seconds, "ffn_fraction": stats.ffn_bytes_fraction,
                  "weight_bytes": stats.decode_weight_bytes, "clusters": stats.cluster_ids})
      line.append(f"{method}{'' if core is None else f' β={beta}'} {tps:.2f}")
    if hf is not None:
      hf_rounds.append(reference.hf_decode_tokens_per_second(hf, prompt, s["decode_steps"]))
      line.append(f"transformers {hf_rounds[-1]:.2f}")
    print(f"round {r} tokens/s: " + ", ".join(line))

  hf_tps = statistics.median(hf_rounds) if hf_rounds else None
  dense_tps = next((_median(out, "tps") for (_, _, core, _), out in zip(variants, rows)
                    if core is None), None)
  runs = []
  for (method, beta, core, _), gen, out in zip(variants, gens, rows):
    tps = _median(out, "tps")
    ffn_fraction, weight_bytes = out[0]["ffn_fraction"], out[0]["weight_bytes"]
    select_gather = (None if core is None else
                     statistics.median([o["select"] + o["gather"] for o in out]))
    dense_prefill = statistics.median([o["prefill"] - o["gather"] - (o["select"] or 0) for o in out])
    run = {
        "method": method,
        "beta": None if core is None else parse_beta(beta),
        "scoring": None if core is None else core.scoring,
        "core": None if core is None else core.summary(),
        "cluster_ids": None if method != "similarity" else [o["clusters"][0] for o in out],
        "decode_tokens_per_second": tps,
        "weight_bytes_per_token": weight_bytes,
        "ffn_bytes_fraction": ffn_fraction,
        "achieved_gb_per_s": tps * weight_bytes / 1e9,
        "fraction_of_probe": tps * weight_bytes / 1e9 / probe,
        "prefill_seconds": _median(out, "prefill"),
        "dense_prefill_seconds": dense_prefill,
        "gather_seconds": None if core is None else _median(out, "gather"),
        "select_gather_seconds": select_gather,
        "select_gather_fraction_of_prefill": None if core is None else select_gather / dense_prefill,
        "compile_seconds": sum(gen.compiled.compile_seconds.values()) + gen.compiled.warm_up_seconds,
        "speedup_vs_hf": tps / hf_tps if hf_tps else None,
        "speedup_vs_dense": tps / dense_tps if dense_tps else None,
        "bound_speedup": dense_bytes / weight_bytes,
    }
    run["fraction_of_bound"] = (run["speedup_vs_dense"] / run["bound_speedup"]
                                if run["speedup_vs_dense"] else None)
    runs.append(run)
    _report(run, s["prompt_len"], hf_tps)
  app.write_json(FLAGS.json_out, {
      "model": m.path,
      "random_weights": bool(s["shape"]),
      "dtype": dtype_name,
      "cache_len": s["cache_len"],
      "prompt_len": s["prompt_len"],
      "decode_steps": s["decode_steps"],
      "rounds": s["rounds"],
      "load_seconds": load_seconds,
      "probe_gb_per_s": probe,
      "hf_decode_tokens_per_second": hf_tps,
      "runs": runs,
  })


def _report(run, prompt_len, hf_tps):
  name = run["method"] + ("" if run["beta"] is None else f" β={run['beta']} ({run['scoring']})")
  line = (f"{name}: {run['decode_tokens_per_second']:.2f} tokens/s, {run['achieved_gb_per_s']:.1f} GB/s "
          f"({run['fraction_of_probe']:.0%} of probe), prefill {run['prefill_seconds'] * 1e3:.0f} ms "
          f"({prompt_len} tokens), compile {run['compile_seconds']:.1f} s")
  if run["select_gather_seconds"] is not None:
    line += (f", select + gather {run['select_gather_seconds'] * 1e3:.0f} ms "
             f"({run['select_gather_fraction_of_prefill']:.0%} of the dense prefill)")
  if run["speedup_vs_dense"] and run["beta"] is not None:
    line += (f", {run['speedup_vs_dense']:.2f}x dense (bound {run['bound_speedup']:.2f}x, "
             f"{run['fraction_of_bound']:.0%} of it)")
  if hf_tps:
    line += f", {run['speedup_vs_hf']:.2f}x transformers ({hf_tps:.2f} tokens/s)"
  print(line)


def entry():
  app.run(main, output_files=["json_out"],
          requires=[optional.Requirement("compare_hf", "torch", optional.TORCH)])
