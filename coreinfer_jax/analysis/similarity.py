"""The paper's second finding, measured: similar sentences have similar core sets.

Over all pairs of texts, the Jaccard similarity of their core sets at each
layer against a label (same vs different group) and against continuous
relations (TF-IDF cosine, sentence-embedding cosine). Plain numbers for JSON.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from coreinfer_jax.offline.clustering import TextStatistics, multi_hot


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
