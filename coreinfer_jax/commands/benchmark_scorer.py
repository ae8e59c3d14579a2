"""Continuation-scorer throughput: multiple-choice examples per second for many methods.

  python scripts/benchmark_scorer.py --data_dir=DATA --task=arc_easy --limit=50 \
      --methods=dense,stability,similarity --cluster_dir=clusters/tqa \
      --betas=0.8,0.6,0.4 --scorings=signed,magnitude,griffin --layer_sets=paper,all \
      --beta_file=docs/smollm2_beta_greedy_valid_search.json --beta_file_scorings=griffin

The method flags are evaluate.py's (`cli.method_sets`). The examples are scored once to compile
every (context, continuation) bucket pair, then scored again, timed, for
--rounds rounds: examples/s excludes compilation. The scores of every round
must agree (they are deterministic). `host_cpu_seconds_per_example` is the CPU
time of the calling thread (Python, tracing-free dispatch, host arrays) per
example: the host's share, which stays small when the scorer is device-bound
(the computation itself runs on XLA's own threads). Both are reported as
min/median/max over the rounds (on stderr; the JSON on stdout gives the median
as before, plus `<figure>_spread` and `<figure>_reason`); `first_pass_seconds`
is one pass, compilation included.
"""

import json
import sys
import time

import numpy as np
from absl import flags

from coreinfer_jax.bench import rounds
from coreinfer_jax.cli import app, method_sets, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.eval import runners, tasks
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
method_sets.define_flags()
flags.DEFINE_string("task", "arc_easy", "a multiple-choice task")
flags.DEFINE_string("json_out", None, "write the result as JSON here")
flags.DEFINE_integer("rounds", 3, "timed passes over the examples")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  task = tasks.get_task(FLAGS.task)
  if task.kind != "multiple_choice":
    raise ValueError(f"--task {FLAGS.task} is not a multiple-choice task")
  if not FLAGS.data_dir:
    raise ValueError("--data_dir is required (the shared data folder)")
  config = models.model_config(FLAGS.model)
  policies = method_sets.build_policies(config, models.model_fingerprint(FLAGS.model))
  m, _ = models.load(FLAGS.model, resolve_dtype(FLAGS.dtype))
  scorer = method_sets.scorer(m, policies)
  examples = tasks.load_examples(task, FLAGS.data_dir, FLAGS.limit, FLAGS.num_fewshot)
  t0 = time.perf_counter()
  first = runners.evaluate_choices(scorer, m.tokenizer, examples, task.name, progress=False)
  warm_seconds = time.perf_counter() - t0
  rates, host = [], []
  for _ in range(FLAGS.rounds):
    t0, host0 = time.perf_counter(), time.thread_time()
    again = runners.evaluate_choices(scorer, m.tokenizer, examples, task.name, progress=False)
    rates.append(len(examples) / (time.perf_counter() - t0))
    host.append((time.thread_time() - host0) / len(examples))
    if [r.metrics for r in again] != [r.metrics for r in first]:
      raise RuntimeError("scores changed between rounds")
  examples_per_second, host_cpu = rounds.measured(rates), rounds.measured(host)
  print(f"{task.name}, {len(examples)} examples, {len(policies)} methods (min/median/max over "
        f"{len(rates)} rounds): {rounds.format_spread(examples_per_second.spread, 2, ' examples/s')}, "
        f"{rounds.describe('host CPU', host_cpu, 2, ' ms per example', 1e3)}; first pass "
        f"(compiles included) {warm_seconds:.1f} s", file=sys.stderr)
  result = {"task": task.name, "examples": len(examples), "methods": len(policies),
            "first_pass_seconds": warm_seconds,
            **rounds.fields("examples_per_second", examples_per_second),
            "rounds": rates,
            **rounds.fields("host_cpu_seconds_per_example", host_cpu),
            "compiles": dict(scorer.compiled.compiles),
            "acc_norm_mean": float(np.mean([r.metrics["acc_norm"] for r in first]))}
  print(json.dumps(result))
  app.write_json(FLAGS.json_out, result)


def entry():
  app.run(main, output_files=["json_out"])
