"""Decode speed against the machine's bandwidth and against transformers.

  python scripts/benchmark.py --config=bench-smollm2 --compare_hf
  python scripts/benchmark.py --shape=tinyllama-1.1b --compare_hf --json_out=out.json

Measurements alternate (ours, transformers, ours, ...) for --rounds rounds and
report medians, so that machine noise hits both sides alike.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from coreinfer_jax import benchmarking, cli  # noqa: E402
from coreinfer_jax.generation import Generator  # noqa: E402
from coreinfer_jax.params import decode_weight_bytes  # noqa: E402

cli.define_model_flags()
flags.DEFINE_string("shape", None, "a model shape in configs/shapes (random weights, real shape)")
flags.DEFINE_integer("num_layers", None, "with --shape: override the depth (to fit memory)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens (random ids)")
flags.DEFINE_integer("decode_steps", 64, "decode steps timed per round")
flags.DEFINE_integer("rounds", 3, "interleaved measurement rounds (medians reported)")
flags.DEFINE_boolean("compare_hf", False, "also time transformers (torch, same dtype and threads)")
flags.DEFINE_string("json_out", None, "write results as JSON here")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  s = cli.settings(FLAGS, ["shape", "dtype", "cache_len", "prompt_len", "decode_steps", "rounds"])
  if s["decode_steps"] < 1 or s["rounds"] < 1 or s["prompt_len"] < 1:
    raise ValueError("--decode_steps, --rounds and --prompt_len must be at least 1")
  dtype = cli.resolve_dtype(s["dtype"])
  dtype_name = np.dtype(dtype).name
  m, load_seconds = cli.load(FLAGS.model, dtype, s["shape"], FLAGS.configs_dir, FLAGS.num_layers)
  if s["shape"]:
    print(f"[random weights in the shape of {s['shape']}"
          f"{f', {FLAGS.num_layers} layers' if FLAGS.num_layers else ''}]")
  weight_bytes = decode_weight_bytes(m.params)
  print(f"[loaded {m.path} in {load_seconds:.1f}s; {weight_bytes / 1e9:.3f} GB of weights read per decode token]")

  probe = benchmarking.probe_gb_per_s(min(weight_bytes, 1 << 30), dtype)
  print(f"probe: {probe:.1f} GB/s weight streaming")

  gen = Generator(m.config, m.params, m.tokenizer, cache_len=s["cache_len"])
  prompt = np.random.default_rng(0).integers(3, m.config.vocab_size, s["prompt_len"]).tolist()
  hf = None
  if FLAGS.compare_hf:
    import torch
    torch.set_num_threads(os.cpu_count())
    hf_config = cli.shape_hf_config(FLAGS.configs_dir, s["shape"], FLAGS.num_layers) if s["shape"] else {}
    hf = benchmarking.hf_model(m.path, hf_config, dtype_name)

  ours, theirs, prefills = [], [], []
  for r in range(s["rounds"]):
    prefill, tps = benchmarking.time_prefill_and_decode(gen, m.params, [prompt], s["decode_steps"])
    ours.append(tps)
    prefills.append(prefill)
    line = f"round {r}: ours {tps:.2f} tokens/s"
    if hf is not None:
      theirs.append(benchmarking.hf_decode_tokens_per_second(hf, prompt, s["decode_steps"]))
      line += f", transformers {theirs[-1]:.2f} tokens/s"
    print(line)

  tps = statistics.median(ours)
  hf_tps = statistics.median(theirs) if theirs else None
  run = {
      "method": "dense",
      "decode_tokens_per_second": tps,
      "weight_bytes_per_token": weight_bytes,
      "achieved_gb_per_s": tps * weight_bytes / 1e9,
      "fraction_of_probe": tps * weight_bytes / 1e9 / probe,
      "prefill_seconds": statistics.median(prefills),
      "compile_seconds": sum(gen.compiled.compile_seconds.values()) + gen.compiled.warm_up_seconds,
      "speedup_vs_hf": tps / hf_tps if hf_tps else None,
  }
  print(f"dense: {tps:.2f} tokens/s, {run['achieved_gb_per_s']:.1f} GB/s "
        f"({run['fraction_of_probe']:.0%} of probe), prefill {run['prefill_seconds'] * 1e3:.0f} ms "
        f"({s['prompt_len']} tokens), compile {run['compile_seconds']:.1f} s, load {load_seconds:.1f} s"
        + (f", {run['speedup_vs_hf']:.2f}x transformers ({hf_tps:.2f} tokens/s)" if hf_tps else ""))
  cli.write_json(FLAGS.json_out, {
      "model": m.path,
      "random_weights": bool(s["shape"]),
      "dtype": dtype_name,
      "cache_len": s["cache_len"],
      "prompt_len": s["prompt_len"],
      "decode_steps": s["decode_steps"],
      "load_seconds": load_seconds,
      "probe_gb_per_s": probe,
      "hf_decode_tokens_per_second": hf_tps,
      "runs": [run],
  })


if __name__ == "__main__":
  app.run(cli.run_main(main))
