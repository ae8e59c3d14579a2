"""Where a decode step's time goes beyond bytes ÷ bandwidth, per kind of operation.

  python scripts/profile_decode.py --config=bench-smollm2
  python scripts/profile_decode.py --shape=tinyllama-1.1b --cache_len=512 --json_out=p.json
  python scripts/profile_decode.py --config=bench-tinyllama --method=stability --beta=0.4 \
      --sparse_layers=all

First the machine's limit, from several probes (`bench/probes.py`: XLA's
batch-1 matrix-vector product, a plain XLA reduction, NumPy's and torch's
matrix-vector products; the highest median is the limit). Then the decode
step (after a prompt of --prompt_len random tokens, on the method's compact
FFNs when sparse), timed two ways: pipelined, as generation runs it
(--pipelined_steps calls, one wait at the end), and one blocking call at a time;
and each kind of operation of the step jitted alone at the step's shapes
(`bench/profile.py`), all interleaved for --repeats rounds: its bytes, time, GB/s, fraction of the limit, and the milliseconds it
takes beyond its bytes at the limit. `rest` is the blocking step minus the
kinds' sum. Every time is min/median/max over the rounds. Last, the step
itself under the profiler for --pipelined_steps steps (`bench/trace.py`): its
time per named scope of the model (attention projections, RoPE, cache
writes, attention over the cache, FFN in / activation / out, norms, output
matrix, sampling, other), measured inside the compiled step, with GB/s where
the scope reads weights or the cache.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import flags

from coreinfer_jax.bench import probes, profile, rounds, trace
from coreinfer_jax.cli import app, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import cost, methods
from coreinfer_jax.runtime.batching import resolve_dtype
from coreinfer_jax.runtime.generator import GenerationStats, Generator

cli_flags.define_model_flags()
cli_flags.define_core_flags()
cli_flags.define_random_input_flags()
flags.DEFINE_integer("pipelined_steps", 32, "pipelined decode steps timed per round")
flags.DEFINE_integer("repeats", 7, "interleaved rounds of every timing")
flags.DEFINE_string("json_out", None, "write the profile as JSON here")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  s = app.settings(["shape", "dtype", "cache_len", "prompt_len", "pipelined_steps", "repeats"]
                   + cli_flags.CORE_FLAGS)
  if min(s["prompt_len"], s["pipelined_steps"], s["repeats"]) < 1:
    raise ValueError("--prompt_len, --pipelined_steps and --repeats must be at least 1")
  # Every decode step of the run writes one more cache slot: a warm-up and
  # `repeats` rounds of one blocking step and `pipelined_steps` pipelined ones,
  # then the traced steps.
  room = (s["repeats"] + 2) * (s["pipelined_steps"] + 1)
  if s["prompt_len"] + room > s["cache_len"]:
    raise ValueError(f"--prompt_len + (--repeats + 2) * (--pipelined_steps + 1) = "
                     f"{s['prompt_len'] + room} slots do not fit --cache_len {s['cache_len']}")
  config = models.model_config(FLAGS.model, s["shape"], FLAGS.configs_dir, FLAGS.num_layers)
  policy = methods.policy_for(s["method"], s, config, cluster_dir=s["cluster_dir"],
                              fingerprint=models.model_fingerprint(FLAGS.model, s["shape"]))
  if policy.token_predictors() is not None:
    raise ValueError("the per-kind breakdown reads fixed rows; --method=predictor chooses them "
                     "per token: time it with benchmark.py")
  m, _ = models.load(FLAGS.model, resolve_dtype(s["dtype"]), s["shape"], FLAGS.configs_dir,
                     FLAGS.num_layers, with_tokenizer=False)   # random prompts: no text
  dense_bytes = cost.decode_weight_bytes(m.params)
  limits = probes.machine_limits(min(dense_bytes, 1 << 30), s["repeats"])
  limit_name = probes.highest(limits)
  limit = limits[limit_name].value
  print(f"[{m.path}{' (random weights)' if s['shape'] else ''}, {s['method']}; machine limit: "
        f"{limit_name} {limit:.1f} GB/s]")
  print("\n".join(probes.describe(limits)))

  gen = Generator(m.config, m.params, cache_len=s["cache_len"], policy=policy,
                  time_selection=False)
  prompt = np.random.default_rng(0).integers(3, m.config.vocab_size, s["prompt_len"]).tolist()
  gen.compile_for(gen.params, 1, gen.bucket([prompt], room))
  state = gen.timed_prefill([prompt], room, GenerationStats())
  kinds = profile.op_kinds(state.decode_params, m.config, jax.tree.map(lambda a: a.copy(),
                                                                      state.cache),
                           state.tokens_B, gen.sampling)
  step_state = [state.tokens_B, state.cache]

  def steps(count):
    tokens, cache = step_state
    for _ in range(count):
      tokens, cache = gen.decode(state.decode_params, cache, tokens)
    step_state[:] = jax.block_until_ready((tokens, cache))

  result = profile.profile(kinds, lambda: steps(1), lambda: steps(s["pipelined_steps"]),
                           s["pipelined_steps"], s["repeats"])
  tokens, cache = step_state
  hlo = gen.decode_hlo(state.decode_params, cache, tokens)
  in_step = trace.scope_seconds(lambda: steps(s["pipelined_steps"]), hlo)
  weight_bytes = cost.decode_weight_bytes_per_sequence(m.params, state.decode_params)
  report = _report(result, weight_bytes, limit)
  report["in_step"] = _report_in_step(in_step, s["pipelined_steps"], kinds)
  app.write_json(FLAGS.json_out, {
      "model": m.path, "random_weights": bool(s["shape"]), "method": s["method"],
      "core": policy.core_summary(),
      "dtype": np.dtype(resolve_dtype(s["dtype"])).name, "cache_len": s["cache_len"],
      "prompt_len": s["prompt_len"], "repeats": s["repeats"],
      "limits_gb_per_s": {n: rounds.fields("gb_per_s", f) for n, f in limits.items()},
      "limit": limit_name, **report})


def _report(result: profile.Profile, weight_bytes: float, limit: float) -> dict:
  """Prints the profile and returns it for the JSON."""
  tokens = rounds.per_second(1, result.pipelined)
  at_limit_ms = weight_bytes / limit / 1e6
  print(f"decode, pipelined: {rounds.describe('', tokens, 2, ' tokens/s').strip()}: "
        f"{weight_bytes / 1e6:.1f} MB of weights per token, "
        f"{tokens.value * weight_bytes / 1e9:.1f} GB/s = {tokens.value * weight_bytes / 1e9 / limit:.0%} "
        f"of the limit (bytes at the limit: {at_limit_ms:.2f} ms per token)")
  print(f"decode, one blocking step at a time: {rounds.describe('', result.step, 2, ' ms', 1e3).strip()}")
  print(f"{'kind':<26} {'MB':>8} {'ms min/median/max':>22} {'GB/s':>7} {'of limit':>9} "
        f"{'beyond bytes':>13}  pattern")
  rows = []
  for kind, figure in result.kinds:
    gb_per_s = kind.bytes_read / figure.value / 1e9
    beyond_ms = figure.value * 1e3 - kind.bytes_read / limit / 1e6
    rate = f"{gb_per_s:>7.1f} {gb_per_s / limit:>9.0%}" if kind.bytes_read else f"{'-':>7} {'-':>9}"
    print(f"{kind.name:<26} {kind.bytes_read / 1e6:>8.1f} "
          f"{rounds.format_spread(figure.spread, 3, '', 1e3):>22} {rate} {beyond_ms:>10.3f} ms  "
          f"{kind.pattern}")
    rows.append({"kind": kind.name, "pattern": kind.pattern, "bytes": kind.bytes_read,
                 **rounds.fields("seconds", figure), "beyond_bytes_seconds": beyond_ms / 1e3})
  print(rounds.describe("rest (step minus the kinds' sum: norms, RoPE, cache writes, adds)",
                        result.rest, 3, " ms", 1e3))
  return {"weight_bytes_per_token": weight_bytes,
          **rounds.fields("pipelined_tokens_per_second", tokens),
          "pipelined_fraction_of_limit": tokens.value * weight_bytes / 1e9 / limit,
          **rounds.fields("blocking_step_seconds", result.step),
          "kinds": rows, **rounds.fields("rest_seconds", result.rest)}


# The scopes of `bench/trace.py` that read what a kind of `bench/profile.py` reads.
_SCOPE_KINDS = {"attention_projections": "attention projections", "ffn_in": "FFN in",
                "ffn_out": "FFN out", "output_matrix": "output matrix",
                "attention_over_cache": "attention over the cache"}


def _report_in_step(seconds, step_count, kinds) -> list:
  """Prints and returns the traced step's time per scope, largest first."""
  kind_bytes = {k.name: k.bytes_read for k in kinds}
  total = sum(seconds.values())
  print(f"inside the step (profiler trace of {step_count} pipelined steps; thunk time summed "
        f"over threads, {total / step_count * 1e3:.2f} ms per step):")
  rows = []
  for scope, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
    per_step = sec / step_count
    read = kind_bytes.get(_SCOPE_KINDS.get(scope), 0)
    rate = f"{read / per_step / 1e9:>7.1f} GB/s" if read and per_step else ""
    print(f"  {scope:<24} {per_step * 1e3:>8.3f} ms {sec / total:>6.1%} {rate}")
    rows.append({"scope": scope, "seconds_per_step": per_step, "share": sec / total,
                 "bytes": read, "gb_per_s": read / per_step / 1e9 if read and per_step else None})
  return rows


def entry():
  app.run(main, output_files=["json_out"])
