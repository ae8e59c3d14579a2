"""Per-layer β calibrated on data, written as the β file `--beta_file` reads.

  python scripts/calibrate.py --data=../shared/data/wikitext2_tokens/valid.txt \
      --target_ffn_fraction=0.7 --out=out/beta.json        # or --max_loss=0.05

Measures each layer's sensitivity (the increase of the continuation's NLL and
its KL to dense when that layer alone is sparsified at each β of --betas, on
--windows windows of --data), then allocates per-layer β that minimise the
predicted loss for the FFN budget, or the smallest budget within --max_loss.
Calibrate on text that is not evaluated (evaluate.py refuses a β file
calibrated on its WikiText-2 test file). --reuse_sensitivity=FILE takes the
measured table from an earlier output with the same model and settings.
"""

from __future__ import annotations

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
flags.DEFINE_list("betas", ["0.2", "0.4", "0.6", "0.8"], "β grid measured per layer")
flags.DEFINE_string("scoring", "signed", f"core-neuron scoring: {' | '.join(SCORINGS)}")
flags.DEFINE_float("alpha", 0.2, "token-wise core fraction (signed, magnitude scorings)")
flags.DEFINE_string("layers", "all", "layers that may be sparsified ('paper', 'all', 'A:B', list)")
flags.DEFINE_enum("loss", "nll", list(calibration.LOSSES), "what is minimised: nll (log of the "
                  "perplexity ratio) or kl (to the dense next-token distribution)")
flags.DEFINE_float("target_ffn_fraction", None, "mean kept FFN fraction over all layers")
flags.DEFINE_float("max_loss", None, "largest predicted loss: for nll the relative perplexity "
                   "increase (0.05 = 5%), for kl nats per token")
flags.DEFINE_integer("steps", 20, "β resolution of the allocation (1/steps)")
flags.DEFINE_string("reuse_sensitivity", None, "an earlier output whose sensitivity table to reuse")
flags.DEFINE_string("out", None, "the β file to write")
flags.DEFINE_bool("progress", True, "progress bar")
FLAGS = flags.FLAGS


def data_record(fingerprint: str):
  with open(FLAGS.data, "rb") as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()
  return {"data": os.path.abspath(FLAGS.data), "sha256": digest, "windows": FLAGS.windows,
          "skip_windows": FLAGS.skip_windows, "window_context": FLAGS.window_context,
          "window_continuation": FLAGS.window_continuation, "scoring": FLAGS.scoring,
          "alpha": FLAGS.alpha, "betas": [float(b) for b in FLAGS.betas], "layers": FLAGS.layers,
          "model_fingerprint": fingerprint}


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
  if FLAGS.reuse_sensitivity:
    sens = reused(record)
  else:
    m, _ = cli.load(FLAGS.model, cli.resolve_dtype(FLAGS.dtype))
    with open(FLAGS.data, encoding="utf-8") as fh:
      ids = m.tokenizer(fh.read())["input_ids"]
    windows = tasks.token_windows(ids, FLAGS.window_context, FLAGS.window_continuation,
                                  FLAGS.windows, FLAGS.skip_windows)
    sens = calibration.measure_sensitivity(
        m.config, m.params, windows, betas=[float(b) for b in FLAGS.betas], scoring=FLAGS.scoring,
        alpha=FLAGS.alpha, layers=layers, progress=FLAGS.progress)
  plan = calibration.allocate(sens, config.num_layers, config.intermediate_size, kind=FLAGS.loss,
                              target_ffn_fraction=FLAGS.target_ffn_fraction,
                              max_loss=FLAGS.max_loss, steps=FLAGS.steps)
  predicted = {"loss": FLAGS.loss, "value": plan.predicted_loss}
  if FLAGS.loss == "nll":
    predicted["perplexity_increase"] = math.expm1(plan.predicted_loss)
  out = {"beta": list(plan.layer_beta), "ffn_fraction": plan.ffn_fraction, "predicted": predicted,
         "target": {"ffn_fraction": FLAGS.target_ffn_fraction, "max_loss": FLAGS.max_loss},
         "calibration": record, "sensitivity": sens.record(),
         "seconds": time.perf_counter() - t0}
  cli.write_json(FLAGS.out, out)
  print(json.dumps({k: out[k] for k in ("beta", "ffn_fraction", "predicted")}))


if __name__ == "__main__":
  app.run(cli.run_main(main))
