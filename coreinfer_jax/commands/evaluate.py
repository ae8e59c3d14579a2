"""Quality under sparsity on real data: dense vs sparse methods, every task kind.

  python scripts/evaluate.py --data_dir=DATA --tasks=wikitext,piqa \
      --methods=dense,stability --betas=0.8,0.6,0.4 --scorings=signed,magnitude \
      --layer_sets=paper,all --limit=500 --json_out=out/eval.json --plot=out/eval.png

Log-likelihood tasks score continuations as decoding would (the context is
prefilled densely and chooses the core neurons; the continuation runs on the
compact FFNs over the context's cache): see coreinfer_jax/eval/scorer.py.
Writes a JSON of every number with its n and settings, a Markdown table
(`--markdown_out`, default beside the JSON) and the frontier plot (`--plot`).

The JSON is rewritten (atomically) after each task: an interrupted or failed
run keeps every finished task, and rerunning the same command computes only
the tasks missing from it (`--overwrite` starts afresh). Timings sit apart
from the results, under "timing", so a resumed run's JSON equals an
uninterrupted one's except for them.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from absl import flags

from coreinfer_jax import checkpoint, files
from coreinfer_jax.analysis import plots
from coreinfer_jax.cli import app, method_sets, models, outputs
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import artefacts, predictor
from coreinfer_jax.eval import frontier, runners, tasks
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
method_sets.define_flags()
flags.DEFINE_list("tasks", ["wikitext", "piqa"], f"tasks: {', '.join(tasks.TASKS)}")
flags.DEFINE_integer("generation_limit", None, "examples per generation task (default: --limit)")
flags.DEFINE_integer("windows", 8, "wikitext: number of windows")
flags.DEFINE_integer("skip_windows", 0, "wikitext: windows skipped at the start of the test file "
                     "(choose settings on windows that a run with --skip_windows=0 then reports)")
flags.DEFINE_integer("window_context", 256, "wikitext: context tokens per window (dense prefill)")
flags.DEFINE_integer("window_continuation", 256, "wikitext: continuation tokens per window (scored)")
flags.DEFINE_integer("window_batch", 1, "wikitext: windows prefilled and decoded together (> 1: "
                     "a shared core set spans them; perplexity only, no KL)")
flags.DEFINE_string("json_out", None, "JSON of every result")
flags.DEFINE_string("markdown_out", None, "Markdown table (default: the JSON's path with .md)")
flags.DEFINE_string("plot", None, "PNG of each metric against FFN bytes (the frontier)")
flags.DEFINE_bool("overwrite", False, "replace an existing --json_out instead of resuming it")
flags.DEFINE_bool("progress", True, "progress bars")
FLAGS = flags.FLAGS


def file_sha256(path: str) -> str:
  with open(path, "rb") as fh:
    return hashlib.sha256(fh.read()).hexdigest()


def check_calibration_disjoint(beta_file: str, data_dir: str) -> None:
  """Calibrated budgets must not be evaluated on the windows they were
  calibrated (or early-stopped) on: any window of the β file's texts that is
  the WikiText-2 test file must lie past the windows evaluated here."""
  record = files.read_json(beta_file)
  wikitext = os.path.join(data_dir, "wikitext2_raw", "wiki.test.raw")
  if not isinstance(record, dict) or not os.path.exists(wikitext):
    return
  evaluated_end = ((FLAGS.skip_windows + FLAGS.windows)
                   * (FLAGS.window_context + FLAGS.window_continuation))
  evaluated_sha256 = file_sha256(wikitext)
  for source in (record.get("calibration"), record.get("holdout")):
    if not source or source.get("sha256") != evaluated_sha256:
      continue
    size = source.get("window_context", 0) + source.get("window_continuation", 0)
    start = source.get("skip_windows", 0) * size
    if not size or start < evaluated_end:
      raise ValueError(f"{beta_file} was calibrated on windows of {wikitext} from token {start} "
                       f"on, which overlap the windows evaluated here (tokens up to "
                       f"{evaluated_end}): calibrate on other text or skip past them")


def main(argv):
  del argv
  if not FLAGS.data_dir:
    raise ValueError("--data_dir is required (the shared data folder)")
  if FLAGS.json_out:
    outputs.check_file(outputs.markdown_path(FLAGS.markdown_out, FLAGS.json_out), "--markdown_out")
  chosen = [tasks.get_task(name) for name in FLAGS.tasks]
  if FLAGS.beta_file and any(t.name == "wikitext" for t in chosen):
    check_calibration_disjoint(FLAGS.beta_file, FLAGS.data_dir)
  config = models.model_config(FLAGS.model)
  fingerprint = models.model_fingerprint(FLAGS.model)
  policies = method_sets.build_policies(config, fingerprint)
  run_settings = result_settings(fingerprint)
  finished = finished_tasks(FLAGS.json_out, run_settings)
  todo = [t for t in chosen if t.name not in finished]
  if finished:
    app.saved(FLAGS.json_out)
    print(f"[resuming {FLAGS.json_out}: {', '.join(finished)} done; to run: "
          f"{', '.join(t.name for t in todo) or 'nothing'}]")
  load_seconds = 0.0
  t0 = time.perf_counter()
  if todo:
    m, load_seconds = models.load(FLAGS.model, resolve_dtype(FLAGS.dtype))
    scorer = method_sets.scorer(m, policies)
  for task in todo:
    finished[task.name] = [r.record() for r in run_task(task, scorer, m.tokenizer)]
    app.write_json(FLAGS.json_out, payload(run_settings, finished, chosen, {
        "load_seconds": load_seconds, "eval_seconds": time.perf_counter() - t0}))
  records = [r for name in task_order(finished, chosen) for r in finished[name]]
  table = frontier.markdown_table(records)
  print(table)
  if FLAGS.json_out:
    files.write_text(outputs.markdown_path(FLAGS.markdown_out, FLAGS.json_out), table)
  if FLAGS.plot:
    name = os.path.basename(checkpoint.model_path(FLAGS.model))
    plots.frontier(records, FLAGS.plot, f"{name}: quality vs FFN bytes")


def run_task(task, scorer, tokenizer):
  if task.kind == "perplexity":
    windows = tasks.text_windows(tokenizer, tasks.wikitext_text(FLAGS.data_dir),
                                 FLAGS.window_context, FLAGS.window_continuation, FLAGS.windows,
                                 FLAGS.skip_windows)
    if FLAGS.window_batch > 1:
      return runners.evaluate_batched_perplexity(scorer, windows, FLAGS.window_batch, task.name,
                                                 FLAGS.progress)
    return runners.evaluate_perplexity(scorer, windows, task.name, FLAGS.progress)
  if task.kind == "multiple_choice":
    examples = tasks.load_examples(task, FLAGS.data_dir, FLAGS.limit, FLAGS.num_fewshot)
    return runners.evaluate_choices(scorer, tokenizer, examples, task.name, FLAGS.progress)
  examples = tasks.load_examples(task, FLAGS.data_dir, FLAGS.generation_limit or FLAGS.limit,
                                 FLAGS.num_fewshot)
  return runners.evaluate_generation(scorer, tokenizer, task, examples, FLAGS.progress)


# Every flag a result depends on (the task list is not one: a rerun may add
# tasks). Files count by content: the model's fingerprint, the β file's
# sha256, the cluster and predictor artefacts' ids; the dtype as resolved on this machine.
RESULT_SETTINGS = ["model", "methods", "betas", "scorings", "layer_sets", "core_blocks",
                   "core_sharings", "alpha", "beta_file", "beta_file_scorings", "buckets",
                   "continuation_buckets", "cluster_dir", "predictor_dir", "importance",
                   "importance_weights",
                   "limit", "generation_limit", "num_fewshot", "windows", "skip_windows",
                   "window_context", "window_continuation", "window_batch", "cache_len"]


def result_settings(fingerprint):
  return dict({n: FLAGS[n].value for n in RESULT_SETTINGS}, fingerprint=fingerprint,
              data_dir=os.path.abspath(FLAGS.data_dir),
              dtype=np.dtype(resolve_dtype(FLAGS.dtype)).name,
              beta_file_sha256=FLAGS.beta_file and file_sha256(FLAGS.beta_file),
              importance_sha256=FLAGS.importance and file_sha256(FLAGS.importance),
              clusters=FLAGS.cluster_dir
              and artefacts.read_manifest(FLAGS.cluster_dir)["artefacts"],
              predictor=FLAGS.predictor_dir
              and predictor.read_manifest(FLAGS.predictor_dir)["artefacts"])


def finished_tasks(path, run_settings):
  """Records by task already in `path` from a run of the same settings; a file
  of other settings is refused (finished work is not overwritten silently)."""
  if not path or not os.path.exists(path) or FLAGS.overwrite:
    return {}
  saved = files.read_json(path)
  if not (isinstance(saved, dict) and isinstance(saved.get("settings"), dict)
          and isinstance(saved.get("results"), list)):
    raise ValueError(f"--json_out {path} exists and is not an evaluate.py output: choose "
                     "another path, or --overwrite to replace it")
  earlier = {k: v for k, v in saved["settings"].items() if k != "tasks"}
  if earlier != run_settings:
    differ = sorted(k for k in set(earlier) | set(run_settings)
                    if earlier.get(k) != run_settings.get(k))
    raise ValueError(f"--json_out {path} holds results of other settings ({', '.join(differ)} "
                     "differ): choose another path, or --overwrite to replace it")
  finished = {}
  for record in saved["results"]:
    finished.setdefault(record["task"], []).append(record)
  return finished


def task_order(finished, chosen):
  """The chosen tasks in their order, then tasks an earlier run saved."""
  names = [t.name for t in chosen if t.name in finished]
  return names + [name for name in finished if name not in names]


def payload(run_settings, finished, chosen, timing):
  order = task_order(finished, chosen)
  return {"settings": dict(run_settings, tasks=order),
          "results": [r for name in order for r in finished[name]],
          "timing": timing}


def entry():
  app.run(main, output_files=["json_out", "markdown_out"], output_plots=["plot"],
          resume="rerun the same command (without --overwrite) to run only the tasks not saved")
