"""Builds a model-global neuron importance from calibration text, once.

  python scripts/importance.py --dataset=DATA/wikitext2_tokens/valid.txt \
      --scoring=griffin --sparse_layers=paper --out=out/importance.npz

Runs the dense prefill over every text (in batches, resumable: finished
batches are kept in OUT.partial-<run>/ until the file is written), takes the
selection's primary ranking key of each text at every sparsified layer, and
writes each layer's mean share (coreinfer_jax/core/importance.py).
`--importance=OUT --importance_weight=W` (generate, benchmark) and
`--importance=OUT --importance_weights=...` (evaluate) mix it with each
prompt's own keys. Build it on text that is not evaluated.
"""

import dataclasses
import os
import sys
import time

from absl import flags

from coreinfer_jax.cli import app, dataset_pass, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import artefacts, importance, methods
from coreinfer_jax.offline import batch_pass, clustering

cli_flags.define_model_flags()
cli_flags.define_core_flags(with_method=False)
cli_flags.define_dataset_flags()
flags.DEFINE_string("out", None, "the importance file to write (.npz, replaced atomically)")
flags.DEFINE_integer("limit", None, "use the first N texts")
dataset_pass.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  t_start = time.perf_counter()
  s = app.settings(["dtype", "batch_size", "max_tokens"] + list(methods.SPEC_SETTINGS))
  if not FLAGS.out or not FLAGS.out.endswith(".npz"):
    raise ValueError(f"--out must name a .npz file, got {FLAGS.out!r}")
  config = models.model_config(FLAGS.model)
  spec = methods.spec_for(s, config)
  plan = clustering.StatisticsPlan(spec.scoring, spec.alpha, spec.sparse_layers)
  data = cli_flags.texts_from_flags(FLAGS.limit)

  m, load_seconds, token_ids = dataset_pass.load_and_tokenize(data.texts, s, "the importance")
  print(f"[loaded {m.path} in {load_seconds:.1f}s; {len(data)} texts, layers "
        f"{list(spec.sparse_layers)}]", file=sys.stderr)
  key = dataset_pass.work_key(m, data.data_hash(), s, dataclasses.asdict(plan))
  work_dir = f"{FLAGS.out}.partial-{key}"
  stats = dataset_pass.collect(m, token_ids, plan, work_dir, s["batch_size"])
  manifest = {
      "model": dataset_pass.model_record(m),
      "core": artefacts.spec_record(spec),
      "dataset": {"name": data.name, "source": os.path.abspath(data.source),
                  "num_texts": len(data), "data_hash": data.data_hash(), "limit": FLAGS.limit,
                  "text_field": FLAGS.text_field, "max_tokens": s["max_tokens"]},
      "batch_size": s["batch_size"], "dtype": s["dtype"],
      **dataset_pass.run_record(stats, {"load": load_seconds}, t_start),
  }
  result = importance.GlobalImportance(importance.from_statistics(stats.primary, config.num_layers),
                                       manifest)
  importance.save(FLAGS.out, result)
  app.saved(FLAGS.out)
  batch_pass.clear_work_dir(work_dir)
  print(f"[importance of {len(spec.sparse_layers)} layers over {len(data)} texts; "
        f"{dataset_pass.batches_line(stats)}; wrote {FLAGS.out}]", file=sys.stderr)


def entry():
  app.run(main, output_files=["out"], resume=dataset_pass.RESUME)
