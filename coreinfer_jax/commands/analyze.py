"""Measures the paper's findings on a model: a JSON of the numbers and a PNG each.

  python scripts/analyze.py --analysis=stability --data_dir=DATA --out_dir=docs
  python scripts/analyze.py --analysis=similarity --data_dir=DATA --out_dir=docs
  python scripts/analyze.py --analysis=clusters --cluster_dir=clusters/tqa --data_dir=DATA \
      --out_dir=docs

stability:  N prompts (TruthfulQA questions by default), N_steps tokens generated densely; per step
            and layer, the overlap of the new token's token-wise core neurons with the sentence
            core set from the prefill, against a random set of the same size.
similarity: over all pairs of N texts, the Jaccard of their core sets per layer against same vs
            different label (TruthfulQA category), TF-IDF cosine (lexical) and, with
            --embedding_model, sentence-embedding cosine: Spearman correlations.
clusters:   the held-out prompts of a cluster.py run (--holdout_fraction): per layer, the overlap
            of each prompt's own core set with its nearest cluster's set vs a random other
            cluster's set vs a random set.
"""

import dataclasses
import json
import os
import time


import numpy as np
from absl import flags

from coreinfer_jax.analysis import held_out, plots, similarity, stability
from coreinfer_jax.cli import app, models, optional
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import artefacts, methods
from coreinfer_jax.eval import datasets
from coreinfer_jax.offline import batch_pass, clustering
from coreinfer_jax.runtime.batching import resolve_dtype

ANALYSES = ("stability", "similarity", "clusters")

cli_flags.define_model_flags()
cli_flags.define_core_flags(with_method=False)
cli_flags.define_dataset_flags()
flags.FLAGS.set_default("sparse_layers", "all")
flags.DEFINE_enum("analysis", None, ANALYSES, "what to measure")
flags.DEFINE_integer("limit", None, "examples used (default: 32 prompts for stability, "
                     "300 texts for similarity)")
flags.DEFINE_integer("num_steps", 64, "stability: tokens generated after each prompt")
flags.DEFINE_integer("cluster_layer", None, "similarity: the layer plotted (default: 25/32 of "
                     "the depth)")
flags.DEFINE_string("embedding_model", None, "similarity: a local sentence-transformers model")
flags.DEFINE_string("cluster_dir", None, "clusters: the folder scripts/cluster.py wrote")
flags.DEFINE_string("out_dir", None, "where ANALYSIS.json and ANALYSIS.png go")
flags.DEFINE_integer("seed", 0, "seed of the random baselines")
FLAGS = flags.FLAGS

DEFAULT_LIMITS = {"stability": 32, "similarity": 300}

# Work folders of finished prefill batches, removed once the results are written.
_WORK_DIRS = []


def _statistics(m, plan, texts, max_tokens):
  """`clustering.collect_statistics` over `texts`, each finished batch saved in
  a work folder of --out_dir so that an interrupted analysis resumes."""
  key = batch_pass.run_key(m.fingerprint, dataclasses.asdict(plan), texts, FLAGS.batch_size,
                           max_tokens, FLAGS.dtype)
  work_dir = os.path.join(FLAGS.out_dir, f".partial-{FLAGS.analysis}-{key}")
  _WORK_DIRS.append(work_dir)
  app.saved(work_dir)
  return clustering.collect_statistics(m.params, m.config,
                                       batch_pass.tokenize(m.tokenizer, texts, max_tokens), plan,
                                       batch_size=FLAGS.batch_size, work_dir=work_dir,
                                       progress=True)


def _stability(m, spec):
  data = cli_flags.texts_from_flags(FLAGS.limit or DEFAULT_LIMITS["stability"])
  if FLAGS.num_steps < 1:
    raise ValueError(f"--num_steps must be at least 1, got {FLAGS.num_steps}")
  prompt_ids = batch_pass.tokenize(m.tokenizer, data.prompts, FLAGS.max_tokens)
  result = stability.stability(m.params, m.config, prompt_ids, spec, FLAGS.num_steps, FLAGS.seed)
  result["dataset"] = data.name
  print(f"[stability: mean overlap {result['overlap_mean']:.3f} vs random {result['random_mean']:.3f}]")
  return result, lambda path, title: plots.stability(result, path, title)


def _similarity(m, spec):
  data = cli_flags.texts_from_flags(FLAGS.limit or DEFAULT_LIMITS["similarity"])
  focus = (clustering.default_cluster_layer(m.config.num_layers) if FLAGS.cluster_layer is None
           else FLAGS.cluster_layer)
  layer_k = {i: k for i, k in enumerate(spec.layer_k) if k is not None}
  if focus not in layer_k:
    raise ValueError(f"layer {focus} is not among the analysed layers {sorted(layer_k)}")
  plan = clustering.StatisticsPlan.for_spec(spec, focus, layer_k[focus])
  stats = _statistics(m, plan, data.texts, FLAGS.max_tokens)
  relations = {"tfidf_cosine": similarity.tfidf_cosine(data.texts)}
  if FLAGS.embedding_model:
    relations["embedding_cosine"] = similarity.embedding_cosine(data.texts, FLAGS.embedding_model)
  result, pairs = similarity.similarity(stats, layer_k, m.config.intermediate_size, data.labels,
                                      relations, focus)
  result["dataset"] = data.name
  result["embedding_model"] = FLAGS.embedding_model
  print(f"[similarity at layer {focus}: {json.dumps(result['focus'])}]")
  return result, lambda path, title: plots.similarity(result, pairs, path, title)


def _held_out(m, cluster_dir):
  art = artefacts.load(cluster_dir)
  artefacts.check_compatible(cluster_dir, art.manifest, config=m.config, fingerprint=m.fingerprint)
  info = art.manifest["dataset"]
  if not info["holdout_fraction"]:
    raise ValueError(f"the artefacts in {cluster_dir} were built without a held-out split "
                     f"(scripts/cluster.py --holdout_fraction)")
  data = datasets.load_texts(info["name"] if info["name"] in datasets.DATASETS else info["source"],
                          FLAGS.data_dir, text_key=info["text_field"], limit=info["limit"])
  if data.data_hash() != info["data_hash"]:
    raise ValueError("the dataset read now differs from the one clustered (data hash)")
  _, held = datasets.split_indices(len(data), info["holdout_fraction"], info["split_seed"])
  prompts = data.subset(held).prompts
  plan = clustering.StatisticsPlan.for_spec(art.spec, art.cluster_layer, art.cluster_k)
  stats = _statistics(m, plan, prompts, info["max_tokens"])
  sets = {i: s for i, s in enumerate(art.layer_sets) if s is not None}
  overlap = held_out.held_out_overlap(stats, art.centroids_CF, sets, m.config.intermediate_size,
                                      FLAGS.seed)
  result = dict(dataclasses.asdict(overlap), num_held_out=len(prompts),
                num_clusters=art.num_clusters, cluster_dir=os.path.abspath(cluster_dir),
                own_cluster_mean=float(np.mean(overlap.own_cluster_by_layer)),
                other_cluster_mean=float(np.mean(overlap.other_cluster_by_layer)),
                random_set_mean=float(np.mean(overlap.random_set_by_layer)),
                clusters_chosen_counts=np.bincount(overlap.clusters_chosen,
                                                   minlength=art.num_clusters).tolist())
  print(f"[{len(prompts)} held-out prompts: overlap with nearest cluster "
        f"{result['own_cluster_mean']:.3f}, other cluster {result['other_cluster_mean']:.3f}, "
        f"random set {result['random_set_mean']:.3f}]")
  return result, lambda path, title: plots.held_out(result, path, title)


def main(argv):
  del argv
  t0 = time.perf_counter()
  if not FLAGS.analysis:
    raise ValueError(f"--analysis is required ({', '.join(ANALYSES)})")
  if not FLAGS.out_dir:
    raise ValueError("--out_dir is required")
  s = app.settings(["dtype"] + list(methods.SPEC_SETTINGS))
  config = models.model_config(FLAGS.model)
  spec = None
  if FLAGS.analysis != "clusters":
    spec = methods.spec_for(s, config)
  elif not FLAGS.cluster_dir:
    raise ValueError("--analysis=clusters needs --cluster_dir")
  m, _ = models.load(FLAGS.model, resolve_dtype(s["dtype"]))
  if m.tokenizer is None:
    raise ValueError(f"{m.path} has no tokenizer")
  if FLAGS.analysis == "stability":
    result, plot = _stability(m, spec)
  elif FLAGS.analysis == "similarity":
    result, plot = _similarity(m, spec)
  else:
    result, plot = _held_out(m, FLAGS.cluster_dir)
  result.update(analysis=FLAGS.analysis, model=m.path, fingerprint=m.fingerprint,
                core=None if spec is None else spec.summary(), seconds=time.perf_counter() - t0)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  json_path = os.path.join(FLAGS.out_dir, f"{FLAGS.analysis}.json")
  png_path = os.path.join(FLAGS.out_dir, f"{FLAGS.analysis}.png")
  app.write_json(json_path, result)
  model_name = os.path.basename(m.path)
  plot(png_path, f"{FLAGS.analysis}: {model_name}"
       + ("" if spec is None else f" (β {s['beta']}, α {spec.alpha}, {spec.scoring})"))
  for work_dir in _WORK_DIRS:
    batch_pass.clear_work_dir(work_dir)
  print(f"[wrote {json_path} and {png_path}]")


def entry():
  app.run(main, output_dirs=["out_dir"],
          requires=[optional.Requirement("embedding_model", "sentence_transformers",
                                         "sentence-transformers")],
          resume="rerun the same command to reuse the finished prefill batches")
