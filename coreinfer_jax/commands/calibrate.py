"""Per-layer β calibrated on data, written as the β file `--beta_file` reads.

  python scripts/calibrate.py --data=DATA/wikitext2_tokens/valid.txt \
      --target_ffn_fraction=0.7 --out=out/beta.json        # or --max_loss=0.05

--allocation=greedy (default) lowers, step by step, the β of the layer whose
step costs least, measuring each candidate's joint loss on --windows windows of
--data with the budgets already chosen, until the FFN target or just before
the measured loss passes --max_loss. --allocation=additive measures each
layer's sensitivity alone (the increase of the continuation's NLL and its KL
to dense at each β of --betas) and allocates by an exact dynamic programme on
the sum of those losses: one measurement, any target, but it assumes the
losses add up, which on SmolLM2 they do not.

--holdout_windows=N stops the greedy trajectory early on held-out windows
(searched to --target_ffn_fraction if given, else to --max_loss)
(--holdout_data, default --data, from window --holdout_skip_windows on): each
prefix is measured jointly there and the deepest step within --max_loss is
kept, since the search's own measurement runs low (it takes the cheapest of
many noisy candidates). --reuse_trajectory=FILE takes the search from an
earlier greedy β file (e.g. one run on an accelerator) and only re-stops it.
Calibrate on text that is not evaluated (evaluate.py refuses a β file whose
windows of its WikiText-2 test file, searched or held out, overlap the
windows it evaluates). --reuse_sensitivity=FILE takes the
measured table from an earlier output with the same model and settings.

Measurement is saved as it goes, in OUT.partial.json (after each greedy step
or each batched pass of the additive table): rerunning an interrupted command
resumes there and gives the β file an uninterrupted run gives; the file is
removed once OUT is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
from absl import flags

from coreinfer_jax import files
from coreinfer_jax.cli import app, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core.cost import kept_rows_fraction
from coreinfer_jax.core.spec import SCORINGS, parse_layers
from coreinfer_jax.eval import tasks
from coreinfer_jax.offline import additive as additive_allocation
from coreinfer_jax.offline import greedy as greedy_allocation
from coreinfer_jax.offline.joint_loss import LOSSES
from coreinfer_jax.runtime.batching import resolve_dtype

cli_flags.define_model_flags()
flags.DEFINE_string("data", None, "calibration text file (e.g. WikiText-2 validation)")
flags.DEFINE_integer("windows", 4, "calibration windows")
flags.DEFINE_integer("skip_windows", 0, "windows skipped at the start of --data")
flags.DEFINE_integer("window_context", 256, "context tokens per window (dense prefill)")
flags.DEFINE_integer("window_continuation", 256, "continuation tokens per window (scored)")
flags.DEFINE_enum("allocation", "greedy", ["greedy", "additive"], "greedy: measured joint "
                  "loss, one β step at a time; additive: single-layer sensitivities + DP")
flags.DEFINE_list("betas", ["0.2", "0.4", "0.6", "0.8"], "additive: β grid measured per layer")
flags.DEFINE_float("min_beta", 0.05, "greedy: smallest β a layer may reach")
flags.DEFINE_integer("rows_per_pass", 8, "candidate budgets scored per batched pass")
flags.DEFINE_string("scoring", "signed", f"core-neuron scoring: {' | '.join(SCORINGS)}")
flags.DEFINE_float("alpha", 0.2, "token-wise core fraction (signed, magnitude scorings)")
flags.DEFINE_string("layers", "all", "layers that may be sparsified ('paper', 'all', 'A:B', list)")
flags.DEFINE_enum("loss", "nll", list(LOSSES), "what is minimised: nll (log of the "
                  "perplexity ratio) or kl (to the dense next-token distribution)")
flags.DEFINE_float("target_ffn_fraction", None, "mean kept FFN fraction over all layers")
flags.DEFINE_float("max_loss", None, "largest predicted loss: for nll the relative perplexity "
                   "increase (0.05 = 5%), for kl nats per token")
flags.DEFINE_integer("steps", 20, "β resolution of the allocation (1/steps)")
flags.DEFINE_string("reuse_sensitivity", None, "additive: an earlier output whose sensitivity "
                    "table to reuse")
flags.DEFINE_string("holdout_data", None, "greedy: held-out text for early stopping (default --data)")
flags.DEFINE_integer("holdout_windows", 0, "greedy: held-out windows (0: stop on the search's own)")
flags.DEFINE_integer("holdout_skip_windows", 0, "greedy: windows skipped at the start of the "
                     "held-out text (keep them apart from the search's and the evaluation's)")
flags.DEFINE_string("reuse_trajectory", None, "greedy: an earlier greedy β file whose trajectory "
                    "to re-stop on the held-out windows")
flags.DEFINE_string("out", None, "the β file to write")
flags.DEFINE_bool("progress", True, "progress bar")
FLAGS = flags.FLAGS


def text_record(path: str, windows: int, skip_windows: int) -> dict:
  """Which windows of which text were read (evaluate.py checks them against its own)."""
  with open(path, "rb") as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()
  return {"data": os.path.abspath(path), "sha256": digest, "windows": windows,
          "skip_windows": skip_windows, "window_context": FLAGS.window_context,
          "window_continuation": FLAGS.window_continuation}


def data_record(fingerprint: str):
  record = dict(text_record(FLAGS.data, FLAGS.windows, FLAGS.skip_windows), scoring=FLAGS.scoring,
                alpha=FLAGS.alpha, layers=FLAGS.layers, model_fingerprint=fingerprint,
                allocation=FLAGS.allocation)
  if FLAGS.allocation == "additive":
    record["betas"] = [float(b) for b in FLAGS.betas]
  else:
    record.update(loss=FLAGS.loss, steps=FLAGS.steps, min_beta=FLAGS.min_beta)
  return record


def partial_identity(record: dict, searched_to_target: bool) -> dict:
  """What an interrupted run's saved measurements depend on: the additive
  table serves any target; a greedy trajectory depends on where it stops
  (the FFN target, or the loss bound when it is searched to that)."""
  identity = dict(record, rows_per_pass=FLAGS.rows_per_pass,
                  dtype=np.dtype(resolve_dtype(FLAGS.dtype)).name)
  if FLAGS.allocation == "greedy":
    identity.update(target_ffn_fraction=FLAGS.target_ffn_fraction,
                    max_loss=None if searched_to_target else FLAGS.max_loss)
  return identity


def partial_path() -> str:
  return f"{FLAGS.out}.partial.json"


def load_partial(identity: dict) -> dict:
  """The measurements an interrupted run of the same settings saved (or none);
  those of other settings are refused, not overwritten."""
  path = partial_path()
  app.saved(path)
  if not os.path.exists(path):
    return {}
  saved = files.read_json(path)
  earlier = saved.get("identity") if isinstance(saved, dict) else None
  if earlier != identity:
    differ = sorted(k for k in set(earlier or {}) | set(identity)
                    if (earlier or {}).get(k) != identity.get(k))
    raise ValueError(f"{path} holds the measurements of an interrupted run with other settings "
                     f"({', '.join(differ)} differ): rerun with those, or delete it to start "
                     "afresh")
  print(f"[resuming from {path}]", file=sys.stderr)
  return saved


def save_partial(identity: dict, **measured) -> None:
  app.write_json(partial_path(), dict(identity=identity, **measured))


def reused(record: dict):
  earlier = files.read_json(FLAGS.reuse_sensitivity)
  if earlier.get("calibration") != record:
    diff = [k for k in record if earlier.get("calibration", {}).get(k) != record[k]]
    raise ValueError(f"--reuse_sensitivity {FLAGS.reuse_sensitivity} was measured with other "
                     f"settings ({', '.join(diff)} differ)")
  return additive_allocation.Sensitivity.from_record(earlier["sensitivity"])


def main(argv):
  del argv
  if not FLAGS.out:
    raise ValueError("--out is required (the β file to write)")
  if not FLAGS.data or not os.path.isfile(FLAGS.data):
    raise FileNotFoundError(f"--data {FLAGS.data!r}: a calibration text file is required")
  searched_to_target = FLAGS.holdout_windows and FLAGS.target_ffn_fraction is not None
  if (FLAGS.target_ffn_fraction is None) == (FLAGS.max_loss is None) and not searched_to_target:
    raise ValueError("give exactly one of --target_ffn_fraction and --max_loss (both only with "
                     "--holdout_windows: search to the target, stop within the loss held out)")
  if FLAGS.scoring not in SCORINGS:
    raise ValueError(f"unknown scoring {FLAGS.scoring!r}; choose one of {', '.join(SCORINGS)}")
  config = models.model_config(FLAGS.model)
  layers = parse_layers(FLAGS.layers, config.num_layers)
  record = data_record(models.model_fingerprint(FLAGS.model))
  t0 = time.perf_counter()
  if FLAGS.reuse_sensitivity and FLAGS.allocation != "additive":
    raise ValueError("--reuse_sensitivity needs --allocation=additive")
  if FLAGS.allocation == "additive" and (FLAGS.holdout_windows or FLAGS.reuse_trajectory):
    raise ValueError("--holdout_windows and --reuse_trajectory need --allocation=greedy")
  if (FLAGS.holdout_windows or FLAGS.reuse_trajectory) and FLAGS.max_loss is None:
    raise ValueError("held-out early stopping (--holdout_windows, --reuse_trajectory) needs --max_loss")
  if FLAGS.reuse_trajectory and not FLAGS.holdout_windows:
    raise ValueError("--reuse_trajectory needs --holdout_windows to re-stop it on")
  identity = partial_identity(record, searched_to_target)
  partial = load_partial(identity)
  if FLAGS.reuse_sensitivity:
    out = additive(reused(record), config)
  else:
    m, _ = models.load(FLAGS.model, resolve_dtype(FLAGS.dtype))
    if FLAGS.allocation == "additive":
      out = additive(additive_allocation.measure_sensitivity(
          m.config, m.params, windows_of(m, FLAGS.data, FLAGS.windows, FLAGS.skip_windows),
          betas=[float(b) for b in FLAGS.betas], scoring=FLAGS.scoring, alpha=FLAGS.alpha,
          layers=layers, rows_per_pass=FLAGS.rows_per_pass, progress=FLAGS.progress,
          measured=(partial.get("nll", []), partial.get("kl", [])),
          on_pass=lambda nll, kl: save_partial(identity, nll=nll, kl=kl)), config)
    else:
      if FLAGS.reuse_trajectory:
        out, record = reused_trajectory(record)
      else:
        out = greedy(greedy_allocation.greedy_allocate(
            m.config, m.params, windows_of(m, FLAGS.data, FLAGS.windows, FLAGS.skip_windows),
            scoring=FLAGS.scoring, alpha=FLAGS.alpha, layers=layers, kind=FLAGS.loss,
            target_ffn_fraction=FLAGS.target_ffn_fraction,
            max_loss=None if searched_to_target else FLAGS.max_loss, steps=FLAGS.steps,
            min_beta=FLAGS.min_beta, rows_per_pass=FLAGS.rows_per_pass, progress=FLAGS.progress,
            resume=[greedy_allocation.GreedyStep(**step)
                    for step in partial.get("trajectory", [])],
            on_step=lambda trajectory: save_partial(
                identity, trajectory=[dataclasses.asdict(step) for step in trajectory])))
      if FLAGS.holdout_windows:
        out = held_out(m, out)
  if all(b is None for b in out["beta"]):
    raise ValueError("no layer could be sparsified within --max_loss: every step of "
                     f"1/{FLAGS.steps} already passes it")
  out.update(target={"ffn_fraction": FLAGS.target_ffn_fraction, "max_loss": FLAGS.max_loss},
             calibration=record, seconds=time.perf_counter() - t0)
  app.write_json(FLAGS.out, out)
  if os.path.exists(partial_path()):
    os.remove(partial_path())
  print(json.dumps({k: out[k] for k in ("beta", "ffn_fraction", "predicted", "measured") if k in out}))


def windows_of(m, path: str, count: int, skip: int):
  return tasks.text_windows(m.tokenizer, files.read_text(path), FLAGS.window_context,
                            FLAGS.window_continuation, count, skip)


def reused_trajectory(record: dict):
  """An earlier greedy search (its trajectory and settings) to re-stop."""
  earlier = files.read_json(FLAGS.reuse_trajectory)
  search = earlier.get("calibration", {})
  if search.get("allocation") != "greedy" or "trajectory" not in earlier:
    raise ValueError(f"--reuse_trajectory {FLAGS.reuse_trajectory} is not a greedy β file")
  differ = [k for k in ("scoring", "alpha", "model_fingerprint", "loss") if search.get(k) != record[k]]
  if differ:
    raise ValueError(f"--reuse_trajectory {FLAGS.reuse_trajectory} was searched with other "
                     f"settings ({', '.join(differ)} differ)")
  return {k: earlier[k] for k in ("beta", "ffn_fraction", "measured", "trajectory")}, search


def held_out(m, out: dict) -> dict:
  """`out` stopped early on the held-out windows (greedy.held_out_stop)."""
  path = FLAGS.holdout_data or FLAGS.data
  trajectory = [greedy_allocation.GreedyStep(**step) for step in out["trajectory"]]
  stop = greedy_allocation.held_out_stop(
      m.config, m.params, windows_of(m, path, FLAGS.holdout_windows, FLAGS.holdout_skip_windows),
      trajectory, scoring=FLAGS.scoring, alpha=FLAGS.alpha, kind=FLAGS.loss,
      max_loss=FLAGS.max_loss, rows_per_pass=FLAGS.rows_per_pass)
  budgets = greedy_allocation.trajectory_budgets(trajectory, m.config.num_layers)
  last = stop.chosen - 1   # the deepest step kept
  beta = list(budgets[last]) if stop.chosen else [None] * m.config.num_layers
  held = {"nll": float(stop.nll[last]), "kl": float(stop.kl[last])} if stop.chosen else {}
  return dict(out, beta=beta, ffn_fraction=kept_rows_fraction(beta, m.config.intermediate_size),
              search_measured=out["measured"], measured=dict(
                  held, perplexity_increase=math.expm1(held.get("nll", 0.0)),
                  dense_nll=stop.dense_nll, tokens=stop.tokens, on="holdout"),
              holdout=dict(text_record(path, FLAGS.holdout_windows, FLAGS.holdout_skip_windows),
                           steps_kept=stop.chosen, nll=stop.nll.tolist(), kl=stop.kl.tolist()))


def perplexity_increase(loss: dict) -> dict:
  if loss["loss"] == "nll":
    loss["perplexity_increase"] = math.expm1(loss["value"])
  return loss


def additive(sens: additive_allocation.Sensitivity, config) -> dict:
  plan = additive_allocation.allocate(sens, config.num_layers, config.intermediate_size, kind=FLAGS.loss,
                              target_ffn_fraction=FLAGS.target_ffn_fraction,
                              max_loss=FLAGS.max_loss, steps=FLAGS.steps)
  return {"beta": list(plan.layer_beta), "ffn_fraction": plan.ffn_fraction,
          "predicted": perplexity_increase({"loss": FLAGS.loss, "value": plan.predicted_loss}),
          "sensitivity": sens.record()}


def greedy(plan: greedy_allocation.GreedyAllocation) -> dict:
  """The β file of a greedy allocation; `measured` is on the calibration windows."""
  return {"beta": list(plan.layer_beta), "ffn_fraction": plan.ffn_fraction,
          "measured": {"nll": plan.measured_nll, "perplexity_increase": math.expm1(plan.measured_nll),
                       "kl": plan.measured_kl, "dense_nll": plan.dense_nll, "tokens": plan.tokens},
          "trajectory": [dataclasses.asdict(step) for step in plan.trajectory]}


def entry():
  app.run(main, output_files=["out"],
          resume="rerun the same command to resume from the measurements saved")
