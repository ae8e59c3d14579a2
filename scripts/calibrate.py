"""Per-layer β calibrated on data, written as the β file `--beta_file` reads.

  python scripts/calibrate.py --data=../shared/data/wikitext2_tokens/valid.txt \
      --target_ffn_fraction=0.7 --out=out/beta.json        # or --max_loss=0.05

--allocation=greedy (default) lowers, step by step, the β of the layer whose
step costs least, measuring each candidate's joint loss on --windows windows of
--data with the budgets already chosen, until the FFN target or just before
the measured loss passes --max_loss. --allocation=additive measures each
layer's sensitivity alone (the increase of the continuation's NLL and its KL
to dense at each β of --betas) and allocates by an exact dynamic programme on
the sum of those losses: one measurement, any target, but it assumes the
losses add up, which on SmolLM2 they do not.
Calibrate on text that is not evaluated (evaluate.py refuses a β file
calibrated on its WikiText-2 test file). --reuse_sensitivity=FILE takes the
measured table from an earlier output with the same model and settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from coreinfer_jax import calibration, cli, tasks
from coreinfer_jax.core import SCORINGS, parse_layers

cli.define_model_flags()
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
flags.DEFINE_enum("loss", "nll", list(calibration.LOSSES), "what is minimised: nll (log of the "
                  "perplexity ratio) or kl (to the dense next-token distribution)")
flags.DEFINE_float("target_ffn_fraction", None, "mean kept FFN fraction over all layers")
flags.DEFINE_float("max_loss", None, "largest predicted loss: for nll the relative perplexity "
                   "increase (0.05 = 5%), for kl nats per token")
flags.DEFINE_integer("steps", 20, "β resolution of the allocation (1/steps)")
flags.DEFINE_string("reuse_sensitivity", None, "additive: an earlier output whose sensitivity "
                    "table to reuse")
flags.DEFINE_string("out", None, "the β file to write")
flags.DEFINE_bool("progress", True, "progress bar")
FLAGS = flags.FLAGS


def data_record(fingerprint: str):
  with open(FLAGS.data, "rb") as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()
  record = {"data": os.path.abspath(FLAGS.data), "sha256": digest, "windows": FLAGS.windows,
            "skip_windows": FLAGS.skip_windows, "window_context": FLAGS.window_context,
            "window_continuation": FLAGS.window_continuation, "scoring": FLAGS.scoring,
            "alpha": FLAGS.alpha, "layers": FLAGS.layers, "model_fingerprint": fingerprint,
            "allocation": FLAGS.allocation}
  if FLAGS.allocation == "additive":
    record["betas"] = [float(b) for b in FLAGS.betas]
  else:
    record.update(loss=FLAGS.loss, steps=FLAGS.steps, min_beta=FLAGS.min_beta)
  return record


def reused(record: dict):
  with open(FLAGS.reuse_sensitivity) as fh:
    earlier = json.load(fh)
  if earlier.get("calibration") != record:
    diff = [k for k in record if earlier.get("calibration", {}).get(k) != record[k]]
    raise ValueError(f"--reuse_sensitivity {FLAGS.reuse_sensitivity} was measured with other "
                     f"settings ({', '.join(diff)} differ)")
  return calibration.Sensitivity.from_record(earlier["sensitivity"])


def main(argv):
  del argv
  if not FLAGS.out:
    raise ValueError("--out is required (the β file to write)")
  if not FLAGS.data or not os.path.isfile(FLAGS.data):
    raise FileNotFoundError(f"--data {FLAGS.data!r}: a calibration text file is required")
  if (FLAGS.target_ffn_fraction is None) == (FLAGS.max_loss is None):
    raise ValueError("give exactly one of --target_ffn_fraction and --max_loss")
  if FLAGS.scoring not in SCORINGS:
    raise ValueError(f"unknown scoring {FLAGS.scoring!r}; choose one of {', '.join(SCORINGS)}")
  config = cli.model_config(FLAGS.model)
  layers = parse_layers(FLAGS.layers, config.num_layers)
  record = data_record(cli.model_fingerprint(FLAGS.model))
  t0 = time.perf_counter()
  if FLAGS.reuse_sensitivity and FLAGS.allocation != "additive":
    raise ValueError("--reuse_sensitivity needs --allocation=additive")
  if FLAGS.reuse_sensitivity:
    out = additive(reused(record), config)
  else:
    m, _ = cli.load(FLAGS.model, cli.resolve_dtype(FLAGS.dtype))
    with open(FLAGS.data, encoding="utf-8") as fh:
      ids = m.tokenizer(fh.read())["input_ids"]
    windows = tasks.token_windows(ids, FLAGS.window_context, FLAGS.window_continuation,
                                  FLAGS.windows, FLAGS.skip_windows)
    if FLAGS.allocation == "additive":
      out = additive(calibration.measure_sensitivity(
          m.config, m.params, windows, betas=[float(b) for b in FLAGS.betas],
          scoring=FLAGS.scoring, alpha=FLAGS.alpha, layers=layers, rows_per_pass=FLAGS.rows_per_pass,
          progress=FLAGS.progress), config)
    else:
      out = greedy(calibration.greedy_allocate(
          m.config, m.params, windows, scoring=FLAGS.scoring, alpha=FLAGS.alpha, layers=layers,
          kind=FLAGS.loss, target_ffn_fraction=FLAGS.target_ffn_fraction,
          max_loss=FLAGS.max_loss, steps=FLAGS.steps, min_beta=FLAGS.min_beta,
          rows_per_pass=FLAGS.rows_per_pass, progress=FLAGS.progress))
  if all(b is None for b in out["beta"]):
    raise ValueError("no layer could be sparsified within --max_loss: every step of "
                     f"1/{FLAGS.steps} already passes it")
  out.update(target={"ffn_fraction": FLAGS.target_ffn_fraction, "max_loss": FLAGS.max_loss},
             calibration=record, seconds=time.perf_counter() - t0)
  cli.write_json(FLAGS.out, out)
  print(json.dumps({k: out[k] for k in ("beta", "ffn_fraction", "predicted", "measured") if k in out}))


def perplexity_increase(loss: dict) -> dict:
  if loss["loss"] == "nll":
    loss["perplexity_increase"] = math.expm1(loss["value"])
  return loss


def additive(sens: calibration.Sensitivity, config) -> dict:
  plan = calibration.allocate(sens, config.num_layers, config.intermediate_size, kind=FLAGS.loss,
                              target_ffn_fraction=FLAGS.target_ffn_fraction,
                              max_loss=FLAGS.max_loss, steps=FLAGS.steps)
  return {"beta": list(plan.layer_beta), "ffn_fraction": plan.ffn_fraction,
          "predicted": perplexity_increase({"loss": FLAGS.loss, "value": plan.predicted_loss}),
          "sensitivity": sens.record()}


def greedy(plan: calibration.GreedyAllocation) -> dict:
  """The β file of a greedy allocation; `measured` is on the calibration windows."""
  return {"beta": list(plan.layer_beta), "ffn_fraction": plan.ffn_fraction,
          "measured": {"nll": plan.measured_nll, "perplexity_increase": math.expm1(plan.measured_nll),
                       "kl": plan.measured_kl, "dense_nll": plan.dense_nll, "tokens": plan.tokens},
          "trajectory": [dataclasses.asdict(step) for step in plan.trajectory]}


if __name__ == "__main__":
  app.run(cli.run_main(main))
