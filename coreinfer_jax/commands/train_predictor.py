"""Trains the learned-predictor baseline (Deja Vu): one low-rank neuron predictor per layer.

  python scripts/train_predictor.py --model=MODEL --data=DATA/wikitext2_tokens/valid.txt \
      --sparse_layers=paper --rank=128 --out_dir=out/predictor

1. The dense prefill runs over every text (batches resumable in
   OUT/.data-<run>/) and keeps, per real token and sparsified layer, the FFN
   input and the token's top neurons by |h| (`offline/predictor_data.py`).
2. The last --holdout_fraction of the texts is held out; the predictors are
   trained on the rest's tokens (`offline/predictor_training.py`: BCE, AdamW
   with warmup and cosine decay, jitted steps), checkpointed every
   --checkpoint_every steps in OUT/.train-<run>/: rerunning an interrupted
   command resumes from the last checkpoint and ends with the same weights.
3. Recall of each held-out token's true top round(β·F) by the predicted top
   round(β·F), per --eval_betas, goes into OUT/manifest.json with the model,
   the layers, the rank, the data's hash, the losses and the seconds; the
   weights into an orbax folder beside it (coreinfer_jax/core/predictor.py).
`--method=predictor --predictor_dir=OUT --beta=B` (generate, benchmark,
evaluate) decodes with it.
"""

import dataclasses
import math
import os
import shutil
import sys
import time

from absl import flags

from coreinfer_jax.cli import app, dataset_pass, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import cost, methods, predictor
from coreinfer_jax.offline import batch_pass, predictor_data, predictor_training

cli_flags.define_model_flags()
cli_flags.define_core_flags(with_method=False)
cli_flags.define_dataset_flags()
flags.DEFINE_alias("data", "dataset")
flags.DEFINE_string("out_dir", None, "where the predictor goes (replaced atomically)")
flags.DEFINE_integer("limit", None, "use the first N texts")
flags.DEFINE_integer("rank", 128, "the predictor's low rank r (Deja Vu: two linear layers "
                     "D -> r -> F)")
flags.DEFINE_float("label_fraction", 0.5, "a token's labels: its top round(f·F) neurons by |h|")
flags.DEFINE_list("eval_betas", ["0.8", "0.6", "0.4"], "recall of the true top round(β·F) is "
                  "measured on the held-out texts at each β")
flags.DEFINE_float("holdout_fraction", 0.1, "the last fraction of the texts, held out for recall")
flags.DEFINE_integer("steps", 2000, "training steps")
flags.DEFINE_integer("batch_tokens", 512, "tokens per step (drawn with replacement)")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW peak learning rate")
flags.DEFINE_integer("warmup_steps", 100, "linear warmup, then cosine decay to a tenth")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
flags.DEFINE_integer("seed", 0, "initialisation and batch-drawing seed")
flags.DEFINE_integer("checkpoint_every", 200, "steps between checkpoints")
dataset_pass.define_flags()
FLAGS = flags.FLAGS


def _fraction(name: str, value: float) -> float:
  if not 0 < value <= 1:
    raise ValueError(f"--{name} must be in (0, 1], got {value}")
  return value


def _settings() -> predictor_training.TrainSettings:
  train = predictor_training.TrainSettings(
      FLAGS.rank, FLAGS.steps, FLAGS.batch_tokens, FLAGS.learning_rate, FLAGS.warmup_steps,
      FLAGS.weight_decay, FLAGS.seed, FLAGS.checkpoint_every)
  train.check()
  return train


def main(argv):
  del argv
  t_start = time.perf_counter()
  s = app.settings(["dtype", "batch_size", "max_tokens"] + list(methods.SPEC_SETTINGS))
  train = _settings()
  betas = tuple(_fraction("eval_betas", float(b)) for b in FLAGS.eval_betas)
  label_fraction = _fraction("label_fraction", FLAGS.label_fraction)
  holdout = FLAGS.holdout_fraction
  if not 0 <= holdout < 1:
    raise ValueError(f"--holdout_fraction must be in [0, 1), got {holdout}")
  config = models.model_config(FLAGS.model)
  spec = methods.spec_for(s, config)
  plan = predictor_data.LabelPlan(spec.sparse_layers, label_fraction, betas)
  data = cli_flags.texts_from_flags(FLAGS.limit)
  num_held_out = math.ceil(holdout * len(data))
  if len(data) - num_held_out < 1:
    raise ValueError(f"{len(data)} texts leave none to train on after --holdout_fraction")

  m, load_seconds, token_ids = dataset_pass.load_and_tokenize(data.texts, s, "the predictor")
  print(f"[loaded {m.path} in {load_seconds:.1f}s; {len(data)} texts ({num_held_out} held out), "
        f"layers {list(spec.sparse_layers)}]", file=sys.stderr)
  data_key = dataset_pass.work_key(m, data.data_hash(), s, dataclasses.asdict(plan))
  data_dir = os.path.join(FLAGS.out_dir, f".data-{data_key}")
  if not FLAGS.resume:
    batch_pass.clear_work_dir(data_dir)
  app.saved(data_dir)
  tokens, data_pass = predictor_data.collect(m.params, m.config, token_ids, plan,
                                             batch_size=s["batch_size"], work_dir=data_dir,
                                             progress=FLAGS.progress)
  train_rows = tokens.text_N < len(data) - num_held_out
  train_dir = os.path.join(FLAGS.out_dir, f".train-{batch_pass.run_key(data_key, train)}")
  if not FLAGS.resume:
    shutil.rmtree(train_dir, ignore_errors=True)
  app.saved(train_dir)
  result = predictor_training.train(tokens.x_NLD[train_rows], tokens.labels_NLP[train_rows],
                                    config.intermediate_size, train, work_dir=train_dir,
                                    progress=FLAGS.progress)
  t_recall = time.perf_counter()
  recall = predictor_training.recall(result.params, tokens.x_NLD[~train_rows],
                                     tokens.top_NLEP[~train_rows], betas, config.intermediate_size)
  layer_predictors = predictor.predictors_from_arrays(
      spec.sparse_layers, result.params["down_LRD"], result.params["up_LFR"], config.num_layers)
  first = spec.sparse_layers[0]
  manifest = {
      "model": dataset_pass.model_record(m),
      "layers": list(spec.sparse_layers), "rank": train.rank,
      "label_fraction": plan.label_fraction,
      # the predictor's bytes (read at every token) over its layer's FFN's
      "predictor_ffn_fraction": (cost.param_bytes(layer_predictors[first])
                                 / cost.param_bytes(m.params.layers[first].ffn)),
      "dataset": {"name": data.name, "source": os.path.abspath(data.source),
                  "num_texts": len(data), "data_hash": data.data_hash(), "limit": FLAGS.limit,
                  "text_field": FLAGS.text_field, "max_tokens": s["max_tokens"],
                  "held_out_texts": num_held_out, "train_tokens": int(train_rows.sum()),
                  "held_out_tokens": int((~train_rows).sum())},
      "training": dict(dataclasses.asdict(train), resumed_from=result.resumed_from,
                       loss_first=result.losses[0], loss_last=result.losses[-1],
                       loss_every_10=result.losses[::10]),
      "recall": recall,
      "batch_size": s["batch_size"], "dtype": s["dtype"],
      "seconds": {"load": load_seconds, "dense_pass": data_pass.seconds,
                  "train": result.seconds, "recall": time.perf_counter() - t_recall,
                  "total": time.perf_counter() - t_start},
      "batches": {"computed": data_pass.computed, "resumed": data_pass.resumed},
  }
  predictor.save(FLAGS.out_dir, predictor.PredictorArtefacts(layer_predictors, manifest))
  app.saved(FLAGS.out_dir)
  batch_pass.clear_work_dir(data_dir)
  shutil.rmtree(train_dir, ignore_errors=True)
  recall_line = ", ".join(f"β {b}: {v['mean']:.3f}" for b, v in recall.items())
  print(f"[predictor of {len(spec.sparse_layers)} layers, rank {train.rank}: "
        f"{tokens.x_NLD.shape[0]} tokens, loss {result.losses[0]:.4f} -> "
        f"{result.losses[-1]:.4f} in {train.steps} steps ({result.seconds:.1f}s); held-out recall "
        f"{recall_line}; wrote {FLAGS.out_dir}]", file=sys.stderr)


def entry():
  app.run(main, output_dirs=["out_dir"], resume=dataset_pass.RESUME)
