"""Quality under sparsity on real data: dense vs sparse methods, every task kind.

  python scripts/evaluate.py --data_dir=../shared/data --tasks=wikitext,piqa \
      --methods=dense,stability --betas=0.8,0.6,0.4 --scorings=signed,magnitude \
      --layer_sets=paper,all --limit=500 --json_out=out/eval.json --plot=out/eval.png

Log-likelihood tasks score continuations as decoding would (the context is
prefilled densely and chooses the core neurons; the continuation runs on the
compact FFNs over the context's cache): see coreinfer_jax/eval/scorer.py.
Writes a JSON of every number with its n and settings, a Markdown table
(`--markdown_out`, default beside the JSON) and the frontier plot (`--plot`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time


from absl import flags

from coreinfer_jax.analysis import plots
from coreinfer_jax.cli import app, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import methods
from coreinfer_jax.core.policy import Dense, Similarity
from coreinfer_jax.eval import frontier, runners, tasks
from coreinfer_jax.eval.scorer import CONTINUATION_BUCKETS, ContinuationScorer
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
flags.DEFINE_list("tasks", ["wikitext", "piqa"], f"tasks: {', '.join(tasks.TASKS)}")
flags.DEFINE_list("methods", ["dense", "stability"], f"methods: {', '.join(methods.METHODS)} "
                  "(with --beta_file, its per-layer budgets are evaluated too)")
flags.DEFINE_list("betas", ["0.8", "0.6", "0.4"], "stability: kept fractions β")
flags.DEFINE_list("scorings", ["signed"], "stability and --beta_file: core-neuron scorings")
flags.DEFINE_list("layer_sets", ["paper"], "stability: sparsified layer sets, each 'paper', "
                  "'all' or 'A:B'")
flags.DEFINE_float("alpha", 0.2, "token-wise core fraction (signed, magnitude scorings)")
flags.DEFINE_string("beta_file", None, "per-layer β file (scripts/calibrate.py)")
flags.DEFINE_list("beta_file_scorings", [], "scorings for --beta_file (default: --scorings)")
flags.DEFINE_string("cluster_dir", None, "similarity: the folder scripts/cluster.py wrote")
flags.DEFINE_string("data_dir", None, "the shared data folder (see its SOURCES.md)")
flags.DEFINE_integer("limit", None, "examples per multiple-choice and generation task")
flags.DEFINE_integer("generation_limit", None, "examples per generation task (default: --limit)")
flags.DEFINE_integer("num_fewshot", 0, "few-shot examples (taken from the end of each file)")
flags.DEFINE_list("buckets", [str(b) for b in DEFAULT_BUCKETS], "context and prompt lengths "
                  "padded to (fewer buckets: fewer compiles, more padding)")
flags.DEFINE_list("continuation_buckets", [str(b) for b in CONTINUATION_BUCKETS],
                  "continuation lengths padded to")
flags.DEFINE_integer("windows", 8, "wikitext: number of windows")
flags.DEFINE_integer("window_context", 256, "wikitext: context tokens per window (dense prefill)")
flags.DEFINE_integer("window_continuation", 256, "wikitext: continuation tokens per window (scored)")
flags.DEFINE_string("json_out", None, "JSON of every result")
flags.DEFINE_string("markdown_out", None, "Markdown table (default: the JSON's path with .md)")
flags.DEFINE_string("plot", None, "PNG of each metric against FFN bytes (the frontier)")
flags.DEFINE_bool("progress", True, "progress bars")
FLAGS = flags.FLAGS


def file_sha256(path: str) -> str:
  with open(path, "rb") as fh:
    return hashlib.sha256(fh.read()).hexdigest()


def check_calibration_disjoint(beta_file: str, data_dir: str) -> None:
  """Calibrated budgets must not be evaluated on the windows they were
  calibrated (or early-stopped) on: any window of the β file's texts that is
  the WikiText-2 test file must lie past the windows evaluated here."""
  with open(beta_file) as fh:
    record = json.load(fh)
  wikitext = os.path.join(data_dir, "wikitext2_raw", "wiki.test.raw")
  if not isinstance(record, dict) or not os.path.exists(wikitext):
    return
  evaluated_end = FLAGS.windows * (FLAGS.window_context + FLAGS.window_continuation)
  evaluated_sha256 = file_sha256(wikitext)
  for source in (record.get("calibration"), record.get("holdout")):
    if not source or source.get("sha256") != evaluated_sha256:
      continue
    size = source.get("window_context", 0) + source.get("window_continuation", 0)
    start = source.get("skip_windows", 0) * size
    if not size or start < evaluated_end:
      raise ValueError(f"{beta_file} was calibrated on windows of {wikitext} from token {start} "
                       f"on, which overlap the {FLAGS.windows} windows evaluated here (tokens 0 to "
                       f"{evaluated_end}): calibrate on other text or skip past them")


def build_policies(config, fingerprint):
  for name in FLAGS.methods:
    methods.check_method(name)
  policies = []
  if "dense" in FLAGS.methods:
    policies.append(Dense())
  if "stability" in FLAGS.methods:
    policies += runners.stability_methods(config, FLAGS.scorings, [float(b) for b in FLAGS.betas],
                                            FLAGS.layer_sets, FLAGS.alpha)
  if FLAGS.beta_file:
    label = "beta_file:" + os.path.splitext(os.path.basename(FLAGS.beta_file))[0]
    policies += runners.beta_file_methods(config, FLAGS.beta_file, label,
                                            FLAGS.beta_file_scorings or FLAGS.scorings, FLAGS.alpha)
  if "similarity" in FLAGS.methods:
    if not FLAGS.cluster_dir:
      raise ValueError("--method=similarity needs --cluster_dir (built by scripts/cluster.py)")
    policies.append(Similarity(methods.load_clusters(FLAGS.cluster_dir, config, fingerprint, None)))
  elif FLAGS.cluster_dir:
    raise ValueError("--cluster_dir is only used with --methods=...,similarity")
  if not policies:
    raise ValueError("no method to evaluate")
  return policies


def main(argv):
  del argv
  if not FLAGS.data_dir:
    raise ValueError("--data_dir is required (the shared data folder)")
  chosen = [tasks.get_task(name) for name in FLAGS.tasks]
  if FLAGS.beta_file and any(t.name == "wikitext" for t in chosen):
    check_calibration_disjoint(FLAGS.beta_file, FLAGS.data_dir)
  config = models.model_config(FLAGS.model)
  fingerprint = models.model_fingerprint(FLAGS.model)
  policies = build_policies(config, fingerprint)
  m, load_seconds = models.load(FLAGS.model, resolve_dtype(FLAGS.dtype))
  scorer = ContinuationScorer(m.config, m.params, policies, cache_len=FLAGS.cache_len,
                              buckets=[int(b) for b in FLAGS.buckets],
                              continuation_buckets=[int(b) for b in FLAGS.continuation_buckets])
  t0 = time.perf_counter()
  results = []
  for task in chosen:
    if task.kind == "perplexity":
      windows = tasks.text_windows(m.tokenizer, tasks.wikitext_text(FLAGS.data_dir),
                                   FLAGS.window_context, FLAGS.window_continuation, FLAGS.windows)
      results += runners.evaluate_perplexity(scorer, windows, task.name, FLAGS.progress)
    elif task.kind == "multiple_choice":
      examples = tasks.load_examples(task, FLAGS.data_dir, FLAGS.limit, FLAGS.num_fewshot)
      results += runners.evaluate_choices(scorer, m.tokenizer, examples, task.name, FLAGS.progress)
    else:
      examples = tasks.load_examples(task, FLAGS.data_dir, FLAGS.generation_limit or FLAGS.limit,
                                     FLAGS.num_fewshot)
      results += runners.evaluate_generation(scorer, m.tokenizer, task, examples, FLAGS.progress)
    partial = [r.record() for r in results]
    app.write_json(FLAGS.json_out, {"settings": settings(fingerprint, load_seconds, t0),
                                    "results": partial})
  records = [r.record() for r in results]
  table = frontier.markdown_table(records)
  print(table)
  if FLAGS.json_out:
    with open(FLAGS.markdown_out or os.path.splitext(FLAGS.json_out)[0] + ".md", "w") as fh:
      fh.write(table)
  if FLAGS.plot:
    plots.frontier(records, FLAGS.plot, f"{os.path.basename(m.path)}: quality vs FFN bytes")


def settings(fingerprint, load_seconds, t0):
  names = ["model", "tasks", "methods", "betas", "scorings", "layer_sets", "alpha", "beta_file",
           "beta_file_scorings", "buckets", "continuation_buckets",
           "cluster_dir", "data_dir", "limit", "generation_limit", "num_fewshot", "windows",
           "window_context", "window_continuation", "cache_len", "dtype"]
  return dict({n: FLAGS[n].value for n in names}, fingerprint=fingerprint,
              load_seconds=load_seconds, eval_seconds=time.perf_counter() - t0)


def entry():
  app.run(main, output_files=["json_out", "markdown_out", "plot"])
