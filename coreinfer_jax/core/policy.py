"""Decoding methods as policy objects: one vocabulary for every consumer.

A policy says what the selecting prefill must rank (`requests`), which core
set each sparsified layer decodes with (`core_sets`, traced inside the
compiled prefill, from the rankings and the policy's own device `arrays`),
and where the decode step's compact FFNs come from (`store`). `Generator`,
the continuation scorer and the lm-eval model take a policy and ask nothing
else of it, so a new method is a new subclass:

- `Dense`: no selection, the dense FFN.
- `Stability`: the prompt's own core sets (CoreInfer's stability-guided rule;
  also a calibrated per-layer β file).
- `GlobalMix`: the prompt's ranking keys mixed with a model-global importance
  computed offline (GLASS-style).
- `Similarity`: the prompt's nearest offline cluster's sets.
- `Predicted`: no core sets; each token's top k from a learned predictor
  (the Deja Vu baseline), chosen inside the decode step.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from coreinfer_jax.core import clusters, cost, selection, store
from coreinfer_jax.core.artefacts import ClusterArtefacts
from coreinfer_jax.core.importance import GlobalImportance, check_weight
from coreinfer_jax.core.predictor import PredictorArtefacts
from coreinfer_jax.core.gather import CoreGather, CoreSets
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.core.taps import (RankRequest, Rankings, merge_requests, order, ranking_tap,
                                     take_core)
from coreinfer_jax.model.forward import Tap
from coreinfer_jax.model.params import ModelParams
from coreinfer_jax.model.token_ffn import NeuronPredictor

Requests = Tuple[Optional[RankRequest], ...]   # per model layer
Keys = Tuple[jax.Array, jax.Array]   # one layer's ranking keys (primary, secondary), [B, F] each


class CorePolicy(abc.ABC):
  """A decoding method. `spec` holds the decode k of every layer (None: the
  policy decodes dense); `name`, `kind` and `family` label its results."""

  def __init__(self, name: str, kind: str, family: str, spec: Optional[CoreSpec]):
    self.name, self.kind, self.family, self.spec = name, kind, family or name, spec

  def requests(self, num_layers: int) -> Requests:
    """Per model layer, the ranking the prefill must compute (None: none)."""
    return (None,) * num_layers

  def arrays(self) -> Any:
    """Device arrays `core_sets` reads (a pytree, passed into the compiled prefill)."""
    return ()

  @abc.abstractmethod
  def core_sets(self, rankings: Rankings, arrays: Any,
                batch: int) -> Tuple[CoreSets, Dict[str, jax.Array]]:
    """(per layer int32 [B, k] or None, extra per-sequence outputs such as
    "cluster_ids" int32 [B]) for a batch of B = `batch` prompts; traced
    inside the compiled prefill."""

  def store(self, compiled, core_gather: CoreGather) -> store.DenseStore:
    """Where decoding's FFNs come from (`compiled`: a CompiledFunctions;
    `core_gather`: how core sets become compact FFNs, and where)."""
    if self.spec is None:
      return store.DenseStore()
    return store.GatherStore(compiled, self.spec.layer_k, core_gather)

  def token_predictors(self) -> Optional[Tuple[Optional[NeuronPredictor], ...]]:
    """Per model layer, the predictor choosing each token's top `spec.layer_k`
    neurons (None: the policy's sets are chosen per prompt, not per token)."""
    return None

  def check_decoding(self, devices: int, offload_ffn: bool, verify: int) -> None:
    """Raises ValueError (one line) for a way of decoding the policy cannot
    serve: a mesh of `devices`, offloaded FFNs, lossless drafts."""

  def ffn_bytes_fraction(self, params: ModelParams) -> float:
    """FFN weight bytes a decode token reads under this policy, over dense
    (from shapes: what evaluation reports beside each score)."""
    return cost.spec_ffn_bytes_fraction(params, self.spec)

  def core_summary(self) -> Optional[dict]:
    """The `"core"` record of the scripts' JSON (None: the policy decodes dense)."""
    return None if self.spec is None else self.spec.summary()

  def summary(self) -> dict:
    return {"method": self.name, "kind": self.kind, "family": self.family,
            **(self.core_summary() or {})}


class Dense(CorePolicy):
  def __init__(self, name: str = "dense"):
    super().__init__(name, "dense", "dense", None)

  def core_sets(self, rankings: Rankings, arrays: Any, batch: int):
    return (None,) * len(rankings), {}


class Stability(CorePolicy):
  """Each prompt's own core sets, chosen by `spec`'s rule in the prefill.
  `with_key_output()`: the same sets, plus each layer's ranking keys in the
  prefill's outputs ("ranking_keys"), from which `sets_from_keys` re-ranks
  after more tokens (`--refresh`)."""

  output_keys = False   # the prefill returns the ranking keys too

  def __init__(self, spec: CoreSpec, name: str = "stability", kind: str = "stability",
               family: str = ""):
    super().__init__(name, kind, family, spec)

  @property
  def ranks_keys(self) -> bool:
    """Whether the sets are ranked here from the keys, not by the prefill's tap."""
    return self.output_keys

  def with_key_output(self) -> "Stability":
    policy = copy.copy(self)
    policy.output_keys = True
    return policy

  def requests(self, num_layers: int) -> Requests:
    spec = self.spec
    return tuple(None if k is None else RankRequest(spec.scoring, spec.alpha, k, spec.blocks,
                                                    spec.shared, spec.top_m, self.ranks_keys)
                 for k in spec.layer_k)

  def core_sets(self, rankings: Rankings, arrays: Any, batch: int):
    requests = self.requests(len(rankings))
    if not self.ranks_keys:
      return tuple(take_core(rankings, i, r) for i, r in enumerate(requests)), {}
    keys = tuple(None if r is None else rankings[i][r.rule] for i, r in enumerate(requests))
    return self.sets_from_keys(keys, arrays), {"ranking_keys": keys} if self.output_keys else {}

  def ranking_keys(self, layer: int, keys_BF: Keys, arrays: Any) -> Keys:
    """What a layer's core set is ranked by, from its ranking keys."""
    return keys_BF

  def sets_from_keys(self, keys: Tuple[Optional[Keys], ...], arrays: Any) -> CoreSets:
    """Per layer int32 [B, k] (B = 1 when shared), or None: the rule over
    per-layer ranking keys (`selection.core_statistics`), which are sums over
    tokens: the prompt's, or the prompt's plus later tokens' (`--refresh`)."""
    spec, sets = self.spec, []
    for layer, k in enumerate(spec.layer_k):
      if k is None:
        sets.append(None)
        continue
      ranked = order(self.ranking_keys(layer, keys[layer], arrays), k, spec.blocks, spec.shared)
      sets.append(ranked.reshape(ranked.shape[0], k))
    return tuple(sets)


class GlobalMix(Stability):
  """Stability's rule with each prompt's primary ranking key replaced by
  (1 − `weight`) · its share + `weight` · the layer's global importance
  (`selection.mix_importance`; GLASS, arXiv 2508.14302): the prefill's tap
  returns the keys and the mix is ranked in the same compiled pass."""

  def __init__(self, spec: CoreSpec, importance: GlobalImportance, weight: float,
               name: str = "", family: str = ""):
    self.weight = check_weight(weight)
    name = name or f"stability/global={self.weight:g}"
    super().__init__(spec, name=name, kind="global_mix", family=family)
    self.importance = importance

  @property
  def ranks_keys(self) -> bool:
    return True

  def arrays(self) -> Any:
    return tuple(None if k is None else jnp.asarray(self.importance.layer_importance[i])
                 for i, k in enumerate(self.spec.layer_k))

  def ranking_keys(self, layer: int, keys_BF: Keys, arrays: Any) -> Keys:
    primary_BF, secondary_BF = keys_BF
    return selection.mix_importance(primary_BF, arrays[layer], self.weight), secondary_BF

  def core_summary(self) -> dict:
    return dict(super().core_summary(), importance_weight=self.weight,
                importance_data=self.importance.manifest["dataset"]["source"])


class Similarity(CorePolicy):
  """The nearest cluster's stored sets; the prefill ranks only the clustering layer."""

  def __init__(self, art: ClusterArtefacts, name: str = "similarity", top_m: str = "bisection"):
    super().__init__(name, "similarity", "similarity", dataclasses.replace(art.spec, top_m=top_m))
    self.art = art

  def requests(self, num_layers: int) -> Requests:
    spec = self.spec
    return tuple(RankRequest(spec.scoring, spec.alpha, self.art.cluster_k, top_m=spec.top_m)
                 if i == self.art.cluster_layer else None for i in range(num_layers))

  def arrays(self) -> Any:
    return (jnp.asarray(self.art.centroids_CF),
            tuple(None if s is None else jnp.asarray(s) for s in self.art.layer_sets))

  def core_sets(self, rankings: Rankings, arrays: Any, batch: int):
    centroids_CF, sets = arrays
    layer = self.art.cluster_layer
    ids_B = clusters.nearest_cluster(centroids_CF, take_core(rankings, layer,
                                                             self.requests(len(rankings))[layer]))
    return tuple(None if s is None else s[ids_B] for s in sets), {"cluster_ids": ids_B}

  def store(self, compiled, core_gather: CoreGather) -> store.DenseStore:
    return store.ClusterStore(compiled, self.art.layer_sets, core_gather)


class Predicted(CorePolicy):
  """Each token's top k (`spec.layer_k`) by a learned predictor, chosen and
  gathered inside the decode step (`model.token_ffn.PredictedFFN`): the
  prefill is dense and ranks nothing."""

  def __init__(self, spec: CoreSpec, art: PredictorArtefacts, name: str = "predictor"):
    super().__init__(name, "predictor", "predictor", spec)
    self.art = art

  def core_sets(self, rankings: Rankings, arrays: Any, batch: int):
    return (None,) * len(rankings), {}

  def token_predictors(self) -> Tuple[Optional[NeuronPredictor], ...]:
    return self.art.layer_predictors

  def check_decoding(self, devices: int, offload_ffn: bool, verify: int) -> None:
    for refused, what in ((devices > 1, "on a mesh (--tp)"), (offload_ffn, "with --offload_ffn"),
                          (verify > 0, "with --verify")):
      if refused:
        raise ValueError(f"--method=predictor does not decode {what}: its rows change at every "
                         "token; use stability or similarity")

  def store(self, compiled, core_gather: CoreGather) -> store.DenseStore:
    return store.PredictorStore(self.spec.layer_k, self.art.layer_predictors)

  def ffn_bytes_fraction(self, params: ModelParams) -> float:
    predicted = jax.eval_shape(lambda p: store.predicted_params(p, self.spec.layer_k,
                                                                self.art.layer_predictors), params)
    return cost.ffn_bytes_fraction(params, predicted)

  def core_summary(self) -> dict:
    """The spec's record with "scoring" naming the predictor (α does not apply)."""
    record = {name: value for name, value in super().core_summary().items()
              if name != "alpha"}
    return dict(record, scoring="predicted per token", predictor_rank=self.art.rank,
                predictor_label_fraction=self.art.manifest["label_fraction"])


def selection_tap(num_layers: int, policies: Sequence[CorePolicy]) -> Optional[Tap]:
  """The ranking tap serving every policy's requests (None when none ranks)."""
  requests = merge_requests(num_layers, *(p.requests(num_layers) for p in policies))
  return ranking_tap(requests) if any(requests) else None
