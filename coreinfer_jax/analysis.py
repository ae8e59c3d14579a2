"""The paper's two findings, measured on any model: core neurons are *stable*
through a sentence and *similar* for semantically similar sentences; and how
well clusters built offline predict a held-out prompt's own core neurons.

Every function returns plain numbers (lists, floats) ready for JSON;
`plots` draws them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax import model, selection
from coreinfer_jax.cache import KVCache
from coreinfer_jax.clustering import TextStatistics, multi_hot
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.core import CoreSpec
from coreinfer_jax.generation import Generator
from coreinfer_jax.params import ModelParams
from coreinfer_jax.similarity import nearest_cluster


def _overlap(token_core_BF: jax.Array, reference_BF: jax.Array) -> jax.Array:
  """float32 [B]: the fraction of each token's core neurons in the reference set."""
  hits = jnp.sum(token_core_BF * reference_BF, axis=-1)
  return hits / jnp.maximum(jnp.sum(token_core_BF, axis=-1), 1)


def decode_overlap_fn(config: ModelConfig, spec: CoreSpec):
  """One greedy dense decode step that also measures, per layer, the overlap
  of this token's token-wise core neurons (top m of its own scores, m = floor(α
  · its positive count)) with the sentence's core set and with a random set.
  (params, cache, tokens [B], sentence sets, random sets: per layer float32
  [B, F] multi-hot) -> (next tokens [B], cache, overlaps [L, B], random [L, B])."""
  relu = not config.is_llama

  def step(params: ModelParams, cache: KVCache, tokens_B, sentence, random):
    def measure(layer, values_BTF, real_BT):
      scores = selection.token_scores(values_BTF, spec.scoring, relu)
      token_core = selection.token_core_counts(scores, real_BT, spec.alpha).astype(jnp.float32)
      return _overlap(token_core, sentence[layer]), _overlap(token_core, random[layer])

    logits, cache, measured = model.forward_with_core(params, config, cache, tokens_B[:, None], measure)
    overlaps = jnp.stack([m[0] for m in measured])
    randoms = jnp.stack([m[1] for m in measured])
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache, overlaps, randoms
  return step


def stability(params: ModelParams, config: ModelConfig, prompt_ids: Sequence[Sequence[int]],
              spec: CoreSpec, num_steps: int, seed: int = 0) -> Dict:
  """Generates `num_steps` tokens densely after each prompt (one batch) and
  measures, at every step and layer, the overlap of the new token's
  token-wise core neurons with the sentence core set of the prefill, against
  a random set of the same size k. Needs every layer sparsified in `spec`."""
  if any(k is None for k in spec.layer_k):
    raise ValueError("the stability analysis needs every layer's core set: use all layers")
  if spec.scoring == "griffin":
    raise ValueError("the stability analysis needs token-wise core neurons: scoring signed or "
                     "magnitude")
  F = config.intermediate_size
  gen = Generator(config, params, cache_len=max(len(p) for p in prompt_ids) + num_steps + 1,
                  buckets=(max(len(p) for p in prompt_ids),), core=spec)
  tokens, cache, core = gen.prefill_padded(params, *gen.pad(prompt_ids, num_steps + 1))
  B = len(prompt_ids)
  sentence = tuple(jnp.asarray(multi_hot(np.asarray(c), F)) for c in core)
  rng = np.random.default_rng(seed)
  random = tuple(jnp.asarray(multi_hot(np.stack([rng.choice(F, k, replace=False) for _ in range(B)]),
                                       F)) for k in spec.layer_k)
  step = jax.jit(decode_overlap_fn(config, spec), donate_argnums=(1,))
  overlaps, randoms = [], []
  for _ in range(num_steps):
    tokens, cache, overlap_LB, random_LB = step(params, cache, tokens, sentence, random)
    overlaps.append(np.asarray(overlap_LB))
    randoms.append(np.asarray(random_LB))
  overlap_SLB, random_SLB = np.stack(overlaps), np.stack(randoms)
  return {
      "num_prompts": B, "num_steps": num_steps, "layer_k": list(spec.layer_k),
      "overlap_by_step_layer": overlap_SLB.mean(-1).tolist(),       # [step][layer], mean over prompts
      "random_by_step_layer": random_SLB.mean(-1).tolist(),
      "overlap_by_layer": overlap_SLB.mean((0, 2)).tolist(),
      "random_by_layer": random_SLB.mean((0, 2)).tolist(),
      "random_expected_by_layer": [k / F for k in spec.layer_k],
      "overlap_mean": float(overlap_SLB.mean()), "random_mean": float(random_SLB.mean()),
  }


def jaccard_matrix(sets_NK: np.ndarray, num_neurons: int) -> np.ndarray:
  """float64 [N, N]: Jaccard similarity of every pair of core sets."""
  hot = multi_hot(sets_NK, num_neurons).astype(np.float64)
  inter = hot @ hot.T
  sizes = hot.sum(1)
  return inter / (sizes[:, None] + sizes[None, :] - inter)


def _pair_values(matrix_NN: np.ndarray) -> np.ndarray:
  return matrix_NN[np.triu_indices(matrix_NN.shape[0], 1)]


def tfidf_cosine(texts: Sequence[str]) -> np.ndarray:
  """[N, N] cosine of TF-IDF vectors: a lexical, not semantic, relation."""
  from sklearn.feature_extraction.text import TfidfVectorizer
  vectors = TfidfVectorizer().fit_transform(texts)
  return (vectors @ vectors.T).toarray()


def embedding_cosine(texts: Sequence[str], model_path: str) -> np.ndarray:
  """[N, N] cosine of sentence embeddings from a local sentence-transformers model."""
  try:
    from sentence_transformers import SentenceTransformer
  except ImportError:
    raise ValueError("--embedding_model needs the sentence-transformers package") from None
  vectors = SentenceTransformer(model_path).encode(list(texts), normalize_embeddings=True)
  return vectors @ vectors.T


def _relation(jaccard_pairs: np.ndarray, relation_pairs: np.ndarray) -> Dict:
  from scipy.stats import spearmanr
  rho, p = spearmanr(jaccard_pairs, relation_pairs)
  return {"spearman": float(rho), "p_value": float(p)}


def similarity(stats: TextStatistics, layer_k: Dict[int, int], num_neurons: int,
               labels: Optional[Sequence[str]], relations: Dict[str, np.ndarray],
               focus_layer: int) -> Tuple[Dict, Dict]:
  """Over all pairs of texts: Jaccard similarity of their core sets at each
  layer, against same label vs different (mean Jaccard of each, Spearman with
  the same-label indicator, ROC AUC) and against each continuous relation
  (`relations`: name -> [N, N] matrix; Spearman). `focus_layer` also keeps
  the pair values for plotting."""
  from sklearn.metrics import roc_auc_score
  same = None
  if labels is not None:
    labels_N = np.asarray(labels)
    same = _pair_values(labels_N[:, None] == labels_N[None, :]).astype(np.float64)
  per_layer: List[Dict] = []
  focus = {}
  for layer, k in sorted(layer_k.items()):
    jac = _pair_values(jaccard_matrix(stats.layer_sets(layer, k), num_neurons))
    expected_inter = k * k / num_neurons   # two independent random k-sets
    row = {"layer": layer, "k": k, "jaccard_mean": float(jac.mean()),
           "jaccard_random_expected": expected_inter / (2 * k - expected_inter)}
    if same is not None and 0 < same.sum() < len(same):
      row.update(jaccard_same_label=float(jac[same == 1].mean()),
                 jaccard_different_label=float(jac[same == 0].mean()),
                 same_label_auc=float(roc_auc_score(same, jac)),
                 same_label=_relation(jac, same))
    for name, matrix in relations.items():
      row[name] = _relation(jac, _pair_values(matrix))
    per_layer.append(row)
    if layer == focus_layer:
      focus = {"jaccard": jac, "same_label": same,
               **{name: _pair_values(matrix) for name, matrix in relations.items()}}
  return {"num_texts": len(stats.cluster_sets_NK), "num_pairs": int(len(focus["jaccard"])),
          "focus_layer": focus_layer, "layers": per_layer,
          "focus": next(r for r in per_layer if r["layer"] == focus_layer)}, focus


@dataclasses.dataclass
class HeldOutOverlap:
  own_cluster_by_layer: List[float]       # mean |prompt set ∩ its cluster's set| / k
  other_cluster_by_layer: List[float]     # the same with a random other cluster
  random_set_by_layer: List[float]        # k / F: a random set of the same size
  layers: List[int]
  clusters_chosen: List[int]


def held_out_overlap(stats: TextStatistics, centroids_CF: np.ndarray,
                     cluster_sets: Dict[int, np.ndarray], num_neurons: int, seed: int = 0
                     ) -> HeldOutOverlap:
  """For each held-out prompt: its nearest cluster (from its clustering-layer
  set), and per sparsified layer the overlap of its own stability set with
  that cluster's stored set, and with a random other cluster's set."""
  chosen = np.asarray(nearest_cluster(jnp.asarray(centroids_CF), jnp.asarray(stats.cluster_sets_NK)))
  C = centroids_CF.shape[0]
  rng = np.random.default_rng(seed)
  other = (chosen + rng.integers(1, C, size=len(chosen))) % C if C > 1 else chosen
  own, others, randoms = [], [], []
  for layer, sets_CK in sorted(cluster_sets.items()):
    k = sets_CK.shape[1]
    prompt_hot = multi_hot(stats.layer_sets(layer, k), num_neurons)
    cluster_hot = multi_hot(sets_CK, num_neurons)
    own.append(float(np.mean((prompt_hot * cluster_hot[chosen]).sum(1) / k)))
    others.append(float(np.mean((prompt_hot * cluster_hot[other]).sum(1) / k)))
    randoms.append(k / num_neurons)
  return HeldOutOverlap(own, others, randoms, sorted(cluster_sets), chosen.tolist())
