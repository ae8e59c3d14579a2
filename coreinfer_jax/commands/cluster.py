"""Builds similarity-guided core-neuron clusters offline over a dataset.

  python scripts/cluster.py --dataset=truthfulqa --data_dir=DATA --out_dir=clusters/tqa
  python scripts/cluster.py --dataset=texts.jsonl --text_field=body --num_clusters=6 --out_dir=DIR

Runs the dense prefill over every text (in batches, resumable: finished
batches are kept in DIR/.partial-<run>/ until the artefacts are written),
takes each text's core set at the clustering layer, clusters the multi-hot
sets with k-means (k by the elbow of the inertia curve over 1..10, at least 4,
unless --num_clusters), and stores each cluster's core set at every sparsified
layer: an orbax checkpoint plus DIR/manifest.json (see coreinfer_jax/core/artefacts.py).
"""

import dataclasses
import os
import sys
import time


from absl import flags

from coreinfer_jax.cli import app, dataset_pass, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import artefacts, methods
from coreinfer_jax.core.spec import num_core_neurons
from coreinfer_jax.eval import datasets
from coreinfer_jax.offline import batch_pass, clustering

cli_flags.define_model_flags()
cli_flags.define_core_flags(with_method=False)
cli_flags.define_dataset_flags()
flags.DEFINE_string("out_dir", None, "where the artefacts go (replaced atomically)")
flags.DEFINE_integer("cluster_layer", None, "layer whose core sets are clustered "
                     "(default: 25/32 of the depth, as the paper)")
flags.DEFINE_float("cluster_beta", None, "core-set size at the clustering layer, as a fraction "
                   "of F (default: that layer's β)")
flags.DEFINE_string("num_clusters", "auto", "'auto' (elbow of k-means inertia over 1..10, at "
                    "least 4) or a number")
flags.DEFINE_integer("limit", None, "use the first N texts")
flags.DEFINE_float("holdout_fraction", 0.0, "leave this fraction of the texts out (a seeded "
                   "split recorded in the manifest, for held-out evaluation)")
flags.DEFINE_integer("split_seed", 0, "seed of the held-out split")
flags.DEFINE_integer("seed", 0, "k-means seed")
dataset_pass.define_flags()
FLAGS = flags.FLAGS


def _num_clusters(text: str):
  if text == "auto":
    return None
  try:
    value = int(text)
  except ValueError:
    raise ValueError(f"--num_clusters {text!r}: expected 'auto' or a number") from None
  if value < 1:
    raise ValueError(f"--num_clusters must be at least 1, got {value}")
  return value


def main(argv):
  del argv
  t_start = time.perf_counter()
  s = app.settings(["dtype", "batch_size", "max_tokens"] + list(methods.SPEC_SETTINGS))
  if not FLAGS.out_dir:
    raise ValueError("--out_dir is required")
  config = models.model_config(FLAGS.model)
  spec = methods.spec_for(s, config)
  layer = (clustering.default_cluster_layer(config.num_layers) if FLAGS.cluster_layer is None
           else FLAGS.cluster_layer)
  if not 0 <= layer < config.num_layers:
    raise ValueError(f"--cluster_layer {layer} is out of range for a model of "
                     f"{config.num_layers} layers")
  cluster_beta = FLAGS.cluster_beta or spec.layer_beta[layer]
  if cluster_beta is None:
    raise ValueError(f"clustering layer {layer} is not sparsified: give --cluster_beta")
  if not 0 < cluster_beta <= 1:
    raise ValueError(f"--cluster_beta must be in (0, 1], got {cluster_beta}")
  requested = _num_clusters(FLAGS.num_clusters)
  plan = clustering.StatisticsPlan.for_spec(
      spec, layer, num_core_neurons(cluster_beta, config.intermediate_size))
  data = cli_flags.texts_from_flags(FLAGS.limit)
  kept, held_out = datasets.split_indices(len(data), FLAGS.holdout_fraction, FLAGS.split_seed)
  clustered = data.subset(kept)
  if requested and requested > len(clustered):
    raise ValueError(f"--num_clusters {requested} exceeds the {len(clustered)} texts clustered")

  m, load_seconds, token_ids = dataset_pass.load_and_tokenize(clustered.texts, s, "clustering")
  print(f"[loaded {m.path} in {load_seconds:.1f}s; clustering layer {layer}, k {plan.cluster_k}; "
        f"{len(clustered)} texts ({len(held_out)} held out)]", file=sys.stderr)
  key = dataset_pass.work_key(m, clustered.data_hash(), s, dataclasses.asdict(plan),
                              artefacts.spec_record(spec))
  work_dir = os.path.join(FLAGS.out_dir, f".partial-{key}")
  stats = dataset_pass.collect(m, token_ids, plan, work_dir, s["batch_size"])

  t0 = time.perf_counter()
  points = clustering.multi_hot(stats.cluster_sets_NK, config.intermediate_size)
  inertia = None
  if requested is None:
    requested, inertia = clustering.choose_num_clusters(points, FLAGS.seed)
  fit = clustering.kmeans(points, requested, FLAGS.seed)
  sets = clustering.cluster_core_sets(fit.labels_, requested, stats, spec.layer_k)
  kmeans_seconds = time.perf_counter() - t0
  sizes = [int((fit.labels_ == c).sum()) for c in range(requested)]
  manifest = {
      "model": dataset_pass.model_record(m),
      "core": artefacts.spec_record(spec),
      "cluster_layer": layer, "cluster_k": plan.cluster_k, "cluster_beta": cluster_beta,
      "num_clusters": requested, "num_clusters_from": "elbow" if inertia else "given",
      "inertia": inertia, "cluster_sizes": sizes,
      "dataset": {"name": data.name, "source": os.path.abspath(data.source),
                  "num_texts": len(clustered), "total_texts": len(data),
                  "data_hash": data.data_hash(), "limit": FLAGS.limit,
                  "holdout_fraction": FLAGS.holdout_fraction, "split_seed": FLAGS.split_seed,
                  "text_field": FLAGS.text_field, "max_tokens": s["max_tokens"]},
      "seed": FLAGS.seed, "batch_size": s["batch_size"], "dtype": s["dtype"],
      **dataset_pass.run_record(stats, {"load": load_seconds, "kmeans": kmeans_seconds}, t_start),
  }
  art = artefacts.ClusterArtefacts(fit.cluster_centers_.astype("float32"), sets,
                                   fit.labels_.astype("int32"), manifest)
  path = artefacts.save(FLAGS.out_dir, art)
  batch_pass.clear_work_dir(work_dir)
  print(f"[{requested} clusters ({manifest['num_clusters_from']}) of sizes {sizes}; "
        f"{dataset_pass.batches_line(stats)}, k-means {kmeans_seconds:.1f}s; wrote {path}]",
        file=sys.stderr)


def entry():
  app.run(main, output_dirs=["out_dir"], resume=dataset_pass.RESUME)
