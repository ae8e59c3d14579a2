"""Decode speed against the machine's bandwidth and against transformers.

  python scripts/benchmark.py --config=bench-smollm2 --compare_hf
  python scripts/benchmark.py --shape=tinyllama-1.1b --compare_hf --json_out=out.json
  python scripts/benchmark.py --config=bench-tinyllama --methods=dense,stability --betas=0.4,0.2 \
      --sparse_layers=all --compare_hf
  python scripts/benchmark.py --config=bench-smollm2 --methods=dense,stability,similarity \
      --cluster_dir=clusters/tqa
  python scripts/benchmark.py --shape=llama3-8b --dtype=bfloat16 --methods=stability \
      --sparse_layers=all --offload_ffn --device_memory_limit_gb=12 --compare_hf_offload

Measurements alternate (each method and β, then transformers) for --rounds
rounds, so that machine noise hits every side alike, and every timed figure
is reported as min/median/max over the rounds (`bench.rounds`; the JSON gives
the median as before plus `<figure>_spread` and `<figure>_reason`). Sparse
runs report `speedup_vs_dense` (per round, over the dense run of that round),
`bound_speedup` (weight bytes read per decode step, dense over sparse) and
`fraction_of_bound`; at batch 1 a speedup whose median exceeds its bound is
noise and is reported as not measurable, with its rounds (a batch's steps are
not bound by bytes alone, so there the speedup is reported as measured).
Bytes are per decode step and device, from the arrays' shardings
(`--batch_size` prompts, `--tp` devices): the batch's rows, each device's
shards. A sparse prefill includes core
selection and the gather. Selection is the selecting prefill minus a dense
prefill of the same prompt, timed right after it in the same round
(`select_seconds`), measurable only when the two prefills' rounds do not
overlap; `select_gather_seconds` adds the gather, round by round.
Transformers' decode time is likewise a difference (`generate` of 1 + N
tokens minus 1 token). An unmeasurable figure is null with its `_reason`.
Similarity-guided runs select at the clustering layer only and gather nothing
once their cluster has been used.
"""

import os
import tempfile

import numpy as np
from absl import flags

from coreinfer_jax.bench import probes, reference, rounds, timing
from coreinfer_jax.cli import app, models, optional
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.commands import benchmark_variants
from coreinfer_jax.core.cost import decode_weight_bytes, decode_weight_bytes_per_device
from coreinfer_jax.core.spec import parse_beta
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime import verify as verifying
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
cli_flags.define_core_flags()
cli_flags.define_mesh_flags()
cli_flags.define_offload_flags()
flags.DEFINE_list("methods", None, "methods to measure interleaved (default: --method)")
flags.DEFINE_list("betas", None, "uniform β values to measure for each sparse method (default: --beta)")
flags.DEFINE_list("core_sharings", None, "core sharings to measure for each sparse method and β "
                  "(default: --core_sharing)")
flags.DEFINE_list("offload_modes", None, "where each sparse run keeps its sparsified FFNs, "
                  "measured interleaved: resident (device memory), device or host (host memory, "
                  "the core rows gathered on that side); default: --offload_ffn and "
                  "--offload_gather")
flags.DEFINE_list("verifies", ["0"], "draft lengths N of the lossless mode to measure for each "
                  "sparse run (0: plain sparse decoding; N: draft N, verify with the dense model)")
flags.DEFINE_list("top_ms", None, "top-m algorithms to measure for each sparse run (default: "
                  "--top_m): the same core sets, the selection's time compared")
flags.DEFINE_float("device_memory_limit_gb", None, "refuse, before loading, a run whose weights "
                   "at peak plus KV cache exceed this much device memory")
flags.DEFINE_integer("batch_size", 1, "prompts decoded together (random ids, --prompt_len each)")
cli_flags.define_random_input_flags()
flags.DEFINE_string("prompts_file", None, "real prompts instead of random ids: a UTF-8 file, one "
                    "prompt a line; round r decodes the next --batch_size lines (cycling), each "
                    "cut to its last --prompt_len tokens (what --verifies accepts depends on text)")
flags.DEFINE_integer("decode_steps", 64, "decode steps timed per round")
flags.DEFINE_integer("rounds", 3, "interleaved measurement rounds (min/median/max reported)")
flags.DEFINE_boolean("compare_hf", False, "also time transformers (torch, same dtype and threads; "
                     "on the CUDA device when torch has one)")
flags.DEFINE_boolean("compare_hf_offload", False, "also time transformers with accelerate's "
                     "offloading (device_map from max_memory = --device_memory_limit_gb; the rest "
                     "in host memory, or on disk where the device is the CPU)")
flags.DEFINE_string("json_out", None, "write results as JSON here")
FLAGS = flags.FLAGS
# The references, by JSON name: transformers resident on the device, and
# offloaded by accelerate to the device budget.
REFERENCES = {"hf": "transformers", "hf_offload": "transformers offloaded"}


def main(argv):
  del argv
  s = app.settings(["shape", "dtype", "cache_len", "prompt_len", "decode_steps", "rounds",
                    "batch_size", "tp"] + cli_flags.CORE_FLAGS)
  if min(s["decode_steps"], s["rounds"], s["prompt_len"], s["batch_size"]) < 1:
    raise ValueError("--decode_steps, --rounds, --prompt_len and --batch_size must be at least 1")
  if FLAGS.compare_hf_offload and FLAGS.device_memory_limit_gb is None:
    raise ValueError("--compare_hf_offload needs --device_memory_limit_gb: the device budget "
                     "transformers is offloaded to")
  config = models.model_config(FLAGS.model, s["shape"], FLAGS.configs_dir, FLAGS.num_layers)
  mesh = cli_flags.mesh_from_flags(config)
  variants = benchmark_variants.variants(s, config, models.model_fingerprint(FLAGS.model, s["shape"]))
  round_prompts = benchmark_variants.round_prompts(s, config.vocab_size)
  dtype = resolve_dtype(s["dtype"])
  for v in variants:
    offloaded = v.offload is not None
    offload.check_fits(FLAGS.device_memory_limit_gb, offload.planned_memory(
        config, v.core, dtype, offloaded, s["batch_size"], s["cache_len"], mesh), offloaded)
  dtype_name = np.dtype(dtype).name
  m, load_seconds = models.load(FLAGS.model, dtype, s["shape"], FLAGS.configs_dir, FLAGS.num_layers)
  if s["shape"]:
    print(f"[random weights in the shape of {s['shape']}"
          f"{f', {FLAGS.num_layers} layers' if FLAGS.num_layers else ''}]")
  dense_bytes = decode_weight_bytes(m.params)
  print(f"[loaded {m.path} in {load_seconds:.1f}s; {dense_bytes / 1e9:.3f} GB of weights read per "
        f"dense decode token]")

  limits = probes.machine_limits(min(dense_bytes, 1 << 30), 10, dtype)
  limit_name = probes.highest(limits)
  print(f"machine limit: {limit_name}, {limits[limit_name].value:.1f} GB/s (the highest probe's "
        f"median; min/median/max over 10 repeats each):")
  print("\n".join(probes.describe(limits)))

  gens = [Generator(m.config, m.params, cache_len=s["cache_len"], policy=v.policy,
                    time_selection=True, selection_rounds=1, mesh=mesh,
                    offload_ffn=v.offload is not None, offload_gather=v.offload or "device",
                    verify=v.verify)
          for v in variants]
  dense_step_bytes = decode_weight_bytes_per_device(gens[0].params)
  # accelerate's disk tier, where the device is the CPU (removed at exit)
  offload_dir = tempfile.TemporaryDirectory(prefix="coreinfer_hf_offload_")
  hf_models, hf_tiers = _references(m.path, s, dtype_name, offload_dir.name)

  variant_rounds = [[] for _ in variants]   # per variant, (prefill stats, decode tokens/s) per round
  hf_seconds = {name: [] for name in hf_models}   # per round, (1 + N tokens, 1 token) seconds
  for r in range(s["rounds"]):
    line = []
    prompts = round_prompts[r]
    for v, gen, out in zip(variants, gens, variant_rounds):
      out.append(timing.time_prefill_and_decode(gen, prompts, s["decode_steps"]))
      line.append(f"{benchmark_variants.label(v)} {out[-1][1]:.2f}")
    for name, hf in hf_models.items():
      hf_seconds[name].append(reference.hf_generate_seconds(hf, prompts[0], s["decode_steps"],
                                                            reference.torch_device()))
      decode_seconds = hf_seconds[name][-1][0] - hf_seconds[name][-1][1]
      line.append(f"{REFERENCES[name]} {s['decode_steps'] / decode_seconds:.2f}"
                  if decode_seconds > 0 else f"{REFERENCES[name]} below its first token's noise")
    print(f"round {r} tokens/s: " + ", ".join(line))

  hf_tps = {name: rounds.per_second(s["decode_steps"], rounds.difference(
      [n for n, _ in seconds], [one for _, one in seconds], "first token"))
      for name, seconds in hf_seconds.items()}
  decode_rates = [rounds.measured([rate for _, rate in out]) for out in variant_rounds]
  dense_tps = next((rate for v, rate in zip(variants, decode_rates) if v.core is None), None)
  runs = []
  for variant, gen, out, tps in zip(variants, gens, variant_rounds, decode_rates):
    plain, figures, prefill = _run(variant, gen, [st for st, _ in out], tps, dense_step_bytes,
                                   limits[limit_name], dense_tps, hf_tps, s["batch_size"])
    prefill_memory = gen.prefill_memory(s["batch_size"], gen.bucket(prompts, s["decode_steps"] + 1))
    runs.append({**plain, "prefill_memory": prefill_memory, **rounds.all_fields(figures)})
    _report(plain, figures, prefill, s["prompt_len"], s["rounds"], hf_tps)
  app.write_json(FLAGS.json_out, {
      "model": m.path,
      "random_weights": bool(s["shape"]),
      "dtype": dtype_name,
      "cache_len": s["cache_len"],
      "prompt_len": s["prompt_len"],
      "decode_steps": s["decode_steps"],
      "rounds": s["rounds"],
      "batch_size": s["batch_size"],
      "tp": s["tp"],
      "load_seconds": load_seconds,
      "limits_gb_per_s": {name: rounds.fields("gb_per_s", f) for name, f in limits.items()},
      "limit": limit_name,
      **rounds.all_fields({f"{name}_decode_tokens_per_second": hf_tps.get(name)
                           for name in REFERENCES}),
      "hf_device": None if not hf_tps else reference.torch_device(),
      "hf_offload_modules": hf_tiers,
      "runs": runs,
  })


def _references(model_path, s, dtype_name, offload_dir):
  """({name: transformers' model} the flags ask for, the offloaded model's
  modules per memory tier, or None)."""
  wanted = [name for name, flag in (("hf", "compare_hf"), ("hf_offload", "compare_hf_offload"))
            if FLAGS[flag].value]
  if not wanted:
    return {}, None
  import torch
  torch.set_num_threads(os.cpu_count())
  hf_config = (models.shape_hf_config(FLAGS.configs_dir, s["shape"], FLAGS.num_layers)
               if s["shape"] else {})
  hf_models, tiers = {}, None
  if "hf" in wanted:
    hf_models["hf"] = reference.hf_model(model_path, hf_config, dtype_name,
                                         reference.torch_device())
  if "hf_offload" in wanted:
    hf_models["hf_offload"], tiers = reference.hf_offloaded(
        reference.hf_model(model_path, hf_config, dtype_name),
        int(FLAGS.device_memory_limit_gb * 1e9), offload_dir)
    print(f"[transformers offloaded to {FLAGS.device_memory_limit_gb:g} GB of "
          f"{reference.torch_device()}: {reference.tiers_line(tiers)}]")
  return hf_models, tiers


def _run(variant, gen, stats, tps, dense_step_bytes, limit, dense_tps, hf_tps, batch_size):
  """(plain JSON fields, figures by JSON name (None: does not apply), the
  prefill's figures) of one variant, from its rounds' prefill stats and
  decode steps/s. Bytes are per decode step and device (the whole batch's
  rows, each device's shards): the bandwidth is each device's. A lossless
  run's round reads the compact weights N times and the dense ones once for
  its accepted drafts plus one token: its bytes per token, and so its bound,
  follow the measured acceptance."""
  method, beta, core = variant.method, variant.beta, variant.core
  sparse = core is not None
  step_bytes = stats[0].decode_weight_bytes_per_device
  token_bytes, verify_record = step_bytes, {"verify": 0}
  if variant.verify:
    counters = ("verify_rounds", "drafts_accepted", "batch_accepted", "draft_seconds",
                "verify_seconds")
    verify_record = verifying.verify_record(variant.verify, batch_size, **{
        name: sum(getattr(st, name) for st in stats) for name in counters})
    token_bytes = ((variant.verify * step_bytes + dense_step_bytes)
                   / (verify_record["mean_accepted_per_verify"] + 1))
  achieved = rounds.scaled(tps, token_bytes / 1e9)
  bound = dense_step_bytes / token_bytes
  selecting = [x for st in stats for x in st.selecting_prefill_rounds]
  prefill = rounds.prefill_figures(selecting, [st.gather_seconds for st in stats],
                                   [x for st in stats for x in st.dense_prefill_rounds])
  speedup = None if dense_tps is None else rounds.ratio(tps, dense_tps)
  if speedup is not None and batch_size == 1:
    # One sequence: both steps stream their weights, so the bytes bound caps
    # the speedup. A batch does B times the arithmetic per byte, and its dense
    # step runs below the bandwidth limit: the bytes ratio caps nothing there.
    speedup = rounds.within_bound(speedup, bound)
  plain = {
      "method": method,
      "beta": None if not sparse else parse_beta(beta),
      "scoring": None if not sparse else variant.policy.core_summary()["scoring"],
      "core": variant.policy.core_summary(),
      "cluster_ids": None if method != "similarity" else [st.cluster_ids[0] for st in stats],
      "weight_bytes_per_token": stats[0].decode_weight_bytes,
      "weight_bytes_per_step_per_device": step_bytes,
      "core_placement": gen.core_placement,
      "tp": 1 if gen.mesh is None else gen.mesh.size,
      "core_device_load": stats[0].core_device_load,
      "offload": variant.offload,   # None: resident; else the gather's side
      **verify_record,
      "memory": stats[0].memory,
      "ffn_bytes_fraction": stats[0].ffn_bytes_fraction,
      "compile_seconds": sum(gen.compiled.compile_seconds.values()) + gen.compiled.warm_up_seconds,
      "bound_speedup": bound,
  }
  figures = {
      "decode_tokens_per_second": tps,
      "batch_tokens_per_second": None if batch_size == 1 else rounds.scaled(tps, batch_size),
      "achieved_gb_per_s": achieved,
      "fraction_of_limit": rounds.scaled(achieved, 1 / limit.value),
      "prefill_seconds": prefill.prefill,
      "dense_prefill_seconds": prefill.dense_prefill if sparse else rounds.measured(selecting),
      "gather_seconds": prefill.gather if sparse else None,
      "select_seconds": prefill.select if sparse else None,
      "select_gather_seconds": prefill.select_gather if sparse else None,
      "select_gather_fraction_of_prefill": prefill.select_gather_fraction if sparse else None,
      **{f"speedup_vs_{name}": None if name not in hf_tps else rounds.ratio(tps, hf_tps[name])
         for name in REFERENCES},
      "speedup_vs_dense": speedup,
      "fraction_of_bound": None if speedup is None else rounds.scaled(speedup, 1 / bound),
  }
  return plain, figures, prefill


def _report(plain, figures, prefill, prompt_len, round_count, hf_tps):
  """A run's figures, min/median/max over the rounds, one line per kind."""
  core = plain["core"]
  name = plain["method"] + ("" if plain["beta"] is None else f" β={plain['beta']} ({plain['scoring']}"
                           f"{', shared' if core['sharing'] == 'shared' else ''}"
                           f"{', top-m by ' + core['top_m'] if FLAGS.top_ms else ''}"
                           f"{', ' + benchmark_variants.memory_label(plain['offload']) if FLAGS.offload_modes else ''}"
                           f"{', verify ' + str(plain['verify']) if plain['verify'] else ''})")
  lines = [
      f"{rounds.describe('decode', figures['decode_tokens_per_second'], 2, ' tokens/s')}"
      f"{_batch(figures['batch_tokens_per_second'])}, "
      f"{_spread(figures['achieved_gb_per_s'], 1, ' GB/s')}{' a device' if plain['tp'] > 1 else ''} "
      f"({_spread(figures['fraction_of_limit'], 0, '%', 100)} of the machine limit)",
      f"{rounds.describe('prefill', figures['prefill_seconds'], 1, ' ms', 1e3)} ({prompt_len} tokens), "
      f"compile {plain['compile_seconds']:.1f} s (once)",
  ]
  if plain["beta"] is not None:
    lines.append(f"{rounds.describe('dense prefill', prefill.dense_prefill, 1, ' ms', 1e3)}; "
                 f"{rounds.describe_selection(prefill)}")
    if plain["verify"]:
      lines.append(f"verify: {plain['acceptance_rate']:.0%} of drafts accepted, "
                   f"{plain['mean_accepted_per_verify']:.2f} a round (of {plain['verify']}); "
                   f"draft {plain['draft_seconds']:.2f} s, verify {plain['verify_seconds']:.2f} s "
                   f"over every round")
    if figures["speedup_vs_dense"] is not None:
      lines.append(_speedup_line(figures["speedup_vs_dense"], figures["fraction_of_bound"],
                                 plain["bound_speedup"]))
  for ref, tps in hf_tps.items():
    if tps.reason:
      lines.append(rounds.describe(REFERENCES[ref], tps, 2, " tokens/s"))
    else:
      speedup = rounds.describe("speedup vs " + REFERENCES[ref], figures["speedup_vs_" + ref], 2, "x")
      lines.append(f"{speedup} ({_spread(tps, 2, ' tokens/s')})")
  over = "one round" if round_count == 1 else f"min/median/max over {round_count} rounds"
  print(f"{name} ({over}):\n  " + "\n  ".join(lines))


def _batch(batch_tokens):
  return "" if batch_tokens is None else f" a sequence ({_spread(batch_tokens, 1, ' tokens/s')} the batch)"


def _spread(figure, digits, unit, scale=1.0):
  return rounds.format_spread(figure.spread, digits, unit, scale)


def _speedup_line(speedup, fraction_of_bound, bound):
  """The speedup over dense against its bound, or why it is noise."""
  line = rounds.describe("speedup vs dense", speedup, 2, "x")
  if speedup.reason:
    return line
  return f"{line} (bound {bound:.2f}x, {_spread(fraction_of_bound, 0, '%', 100)} of it)"


def entry():
  app.run(main, output_files=["json_out"],
          requires=[optional.Requirement("compare_hf", "torch", optional.TORCH),
                    optional.Requirement("compare_hf_offload", "torch", optional.TORCH),
                    optional.Requirement("compare_hf_offload", "accelerate", "accelerate")])
