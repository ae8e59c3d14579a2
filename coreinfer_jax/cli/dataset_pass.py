"""What the commands that prefill a whole dataset offline share (cluster.py,
importance.py): the resumable statistics pass, and the manifest's records of
the model and of the run."""

from __future__ import annotations

import dataclasses
import datetime
import time

from absl import flags

from coreinfer_jax.cli import app, models
from coreinfer_jax.offline import batch_pass, clustering
from coreinfer_jax.runtime.batching import resolve_dtype

FLAGS = flags.FLAGS
RESUME = "rerun the same command (without --noresume) to reuse the finished batches"


def define_flags() -> None:
  flags.DEFINE_boolean("resume", True, "reuse finished batches of an interrupted identical run")
  flags.DEFINE_boolean("progress", True, "show a progress bar")


def load_and_tokenize(texts, s: dict, purpose: str):
  """(the model of --model, its load seconds, each text's token ids, at most
  s["max_tokens"]); `purpose` names the command in the one-line error for a
  model without a tokenizer."""
  m, load_seconds = models.load(FLAGS.model, resolve_dtype(s["dtype"]))
  if m.tokenizer is None:
    raise ValueError(f"{m.path} has no tokenizer: {purpose} needs one to read the texts")
  return m, load_seconds, batch_pass.tokenize(m.tokenizer, texts, s["max_tokens"])


def work_key(m, data_hash: str, s: dict, *parts) -> str:
  """The run key naming an interrupted run's work folder: the model, the
  data, the batching and dtype, and the command's own `parts`."""
  return batch_pass.run_key(m.fingerprint, *parts, data_hash, s["batch_size"], s["max_tokens"],
                            s["dtype"])


def collect(m, token_ids, plan: clustering.StatisticsPlan, work_dir: str,
            batch_size: int) -> clustering.TextStatistics:
  """`clustering.collect_statistics` with finished batches kept in `work_dir`
  (cleared first with --noresume; named on Ctrl-C)."""
  if not FLAGS.resume:
    batch_pass.clear_work_dir(work_dir)
  app.saved(work_dir)
  return clustering.collect_statistics(m.params, m.config, token_ids, plan, batch_size=batch_size,
                                       work_dir=work_dir, progress=FLAGS.progress)


def model_record(m) -> dict:
  return {"path": m.path, "fingerprint": m.fingerprint, "config": dataclasses.asdict(m.config)}


def run_record(stats: clustering.TextStatistics, seconds: dict, t_start: float) -> dict:
  """The manifest's seconds (`seconds` plus the prefill's and the total),
  batches and creation time."""
  return {"seconds": dict(seconds, prefill=stats.seconds, total=time.perf_counter() - t_start),
          "batches": {"computed": stats.batches_computed, "resumed": stats.batches_resumed},
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def batches_line(stats: clustering.TextStatistics) -> str:
  return (f"prefill {stats.seconds:.1f}s over {stats.batches_computed} batches "
          f"({stats.batches_resumed} resumed)")
