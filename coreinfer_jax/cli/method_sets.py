"""The methods a scoring run compares, and how it is batched: the flags and
the policies of `evaluate.py` and `benchmark_scorer.py`."""

from __future__ import annotations

import os

from absl import flags

from coreinfer_jax.core import importance, methods
from coreinfer_jax.core.policy import Dense, GlobalMix, Similarity, Stability
from coreinfer_jax.eval import runners
from coreinfer_jax.eval.scorer import CONTINUATION_BUCKETS, ContinuationScorer
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("methods", ["dense", "stability"], f"methods: {', '.join(methods.METHODS)} "
                    "(with --beta_file, its per-layer budgets are evaluated too)")
  flags.DEFINE_list("betas", ["0.8", "0.6", "0.4"], "stability and predictor: kept fractions β")
  flags.DEFINE_list("scorings", ["signed"], "stability and --beta_file: core-neuron scorings")
  flags.DEFINE_list("layer_sets", ["paper"], "stability: sparsified layer sets, each 'paper', "
                    "'all' or 'A:B'")
  flags.DEFINE_list("core_blocks", ["1"], "stability: each setting with its core set chosen in "
                    "these numbers of neuron blocks, k/N from each (N: what --core_placement="
                    "local chooses on an N-device mesh; 1: over all neurons, as global does)")
  flags.DEFINE_list("core_sharings", ["per_sequence"], "stability: each setting with per-sequence "
                    "and/or batch-shared core sets (shared differs only with --window_batch > 1)")
  flags.DEFINE_float("alpha", 0.2, "token-wise core fraction (signed, magnitude scorings)")
  flags.DEFINE_string("beta_file", None, "per-layer β file (scripts/calibrate.py)")
  flags.DEFINE_list("beta_file_scorings", [], "scorings for --beta_file (default: --scorings)")
  flags.DEFINE_string("cluster_dir", None, "similarity: the folder scripts/cluster.py wrote")
  flags.DEFINE_string("predictor_dir", None, "predictor: the folder scripts/train_predictor.py "
                      "wrote (its layers; each token's top round(β·F) per --betas)")
  flags.DEFINE_string("importance", None, "a model-global importance file (scripts/importance.py): "
                      "each stability and --beta_file setting of its scoring and α is also "
                      "evaluated mixed with it at each of --importance_weights")
  flags.DEFINE_list("importance_weights", ["0.5"], "with --importance: mix weights w in [0, 1]")
  flags.DEFINE_string("data_dir", None, "the shared data folder (see its SOURCES.md)")
  flags.DEFINE_integer("limit", None, "examples per multiple-choice and generation task")
  flags.DEFINE_integer("num_fewshot", 0, "few-shot examples (taken from the end of each file)")
  flags.DEFINE_list("buckets", [str(b) for b in DEFAULT_BUCKETS], "context and prompt lengths "
                    "padded to (fewer buckets: fewer compiles, more padding)")
  flags.DEFINE_list("continuation_buckets", [str(b) for b in CONTINUATION_BUCKETS],
                    "continuation lengths padded to")


def build_policies(config, fingerprint):
  """Every method the flags name, checked before any weights load."""
  for name in FLAGS.methods:
    methods.check_method(name)
  policies = []
  if "dense" in FLAGS.methods:
    policies.append(Dense())
  if "stability" in FLAGS.methods:
    policies += runners.stability_methods(config, FLAGS.scorings, [float(b) for b in FLAGS.betas],
                                          FLAGS.layer_sets, FLAGS.alpha,
                                          [int(n) for n in FLAGS.core_blocks], FLAGS.core_sharings)
  if FLAGS.beta_file:
    label = "beta_file:" + os.path.splitext(os.path.basename(FLAGS.beta_file))[0]
    policies += runners.beta_file_methods(config, FLAGS.beta_file, label,
                                          FLAGS.beta_file_scorings or FLAGS.scorings, FLAGS.alpha)
  if FLAGS.importance:
    policies += _global_mixes(policies, config, fingerprint)
  if "similarity" in FLAGS.methods:
    if not FLAGS.cluster_dir:
      raise ValueError("--method=similarity needs --cluster_dir (built by scripts/cluster.py)")
    policies.append(Similarity(methods.load_clusters(FLAGS.cluster_dir, config, fingerprint, None)))
  elif FLAGS.cluster_dir:
    raise ValueError("--cluster_dir is only used with --methods=...,similarity")
  if "predictor" in FLAGS.methods:
    if not FLAGS.predictor_dir:
      raise ValueError("--methods=...,predictor needs --predictor_dir (built by "
                       "scripts/train_predictor.py)")
    art = methods.load_predictor(FLAGS.predictor_dir, config, fingerprint, None)
    policies += runners.predictor_methods(config, art, [float(b) for b in FLAGS.betas])
  elif FLAGS.predictor_dir:
    raise ValueError("--predictor_dir is only used with --methods=...,predictor")
  if not policies:
    raise ValueError("no method to evaluate")
  return policies


def _global_mixes(policies, config, fingerprint):
  """Each stability-guided setting of the importance file's scoring and α,
  mixed with it at each weight of --importance_weights."""
  weights = importance.parse_weights(FLAGS.importance_weights)
  loaded = importance.load(FLAGS.importance)
  core = loaded.manifest["core"]
  mixable = [p for p in policies if isinstance(p, Stability)
             and (p.spec.scoring, p.spec.alpha) == (core["scoring"], core["alpha"])]
  if not mixable:
    raise ValueError(f"--importance {FLAGS.importance} was built for scoring {core['scoring']} "
                     f"and α {core['alpha']}: no stability setting evaluated here has them")
  for p in mixable:
    importance.check_compatible(FLAGS.importance, loaded, config=config, fingerprint=fingerprint,
                                spec=p.spec)
  return [GlobalMix(p.spec, loaded, w, name=f"{p.name}/global={w:g}",
                    family=f"{p.family}/global={w:g}") for p in mixable for w in weights]


def scorer(m, policies) -> ContinuationScorer:
  """The continuation scorer of the loaded model `m` for `policies`, batched as the flags say."""
  return ContinuationScorer(m.config, m.params, policies, cache_len=FLAGS.cache_len,
                            buckets=[int(b) for b in FLAGS.buckets],
                            continuation_buckets=[int(b) for b in FLAGS.continuation_buckets])
