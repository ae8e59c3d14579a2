"""Policies from user settings (method name + core flags), checked before any weights load.

Shared by the scripts and the lm-eval model: `policy_for` turns a method
name and the settings of the core flags into a `CorePolicy`, validating the
settings against the model's config (and, for similarity, the cluster
artefacts against the config, the checkpoint's fingerprint and the settings)
so that bad input fails in seconds with one line.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from coreinfer_jax.core import artefacts, importance, predictor
from coreinfer_jax.core.policy import (CorePolicy, Dense, GlobalMix, Predicted, Similarity,
                                       Stability)
from coreinfer_jax.core.spec import CORE_PLACEMENTS, CoreSpec, core_spec, parse_beta
from coreinfer_jax.model.config import ModelConfig

METHODS = ("dense", "stability", "similarity", "predictor")
SPEC_SETTINGS = ("beta", "alpha", "scoring", "sparse_layers", "beta_file")


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def spec_for(settings: Mapping[str, Any], config: ModelConfig,
             beta: Optional[str] = None) -> CoreSpec:
  """The validated `CoreSpec` of the `SPEC_SETTINGS`; `beta` overrides
  settings["beta"]. Where the settings hold them (the decoding commands):
  "core_sharing", and "core_placement" with "tp" (`local` on a mesh of tp
  devices chooses k/tp neurons in each device's block)."""
  placement = settings.get("core_placement", "local")
  if placement not in CORE_PLACEMENTS:
    raise ValueError(f"unknown core placement {placement!r}; choose one of "
                     f"{', '.join(CORE_PLACEMENTS)}")
  return core_spec(config.num_layers, config.intermediate_size,
                   beta=parse_beta(settings["beta"] if beta is None else beta),
                   alpha=settings["alpha"], scoring=settings["scoring"],
                   sparse_layers=settings["sparse_layers"], beta_file=settings["beta_file"],
                   blocks=settings.get("tp", 1) if placement == "local" else 1,
                   sharing=settings.get("core_sharing", "per_sequence"),
                   top_m=settings.get("top_m", "bisection"))


def load_clusters(cluster_dir: str, config: ModelConfig, fingerprint: Optional[str],
                  spec: Optional[CoreSpec]) -> artefacts.ClusterArtefacts:
  """The artefacts in `cluster_dir`, checked against the model and the core
  settings asked for (small arrays: before any weights load)."""
  art = artefacts.load(cluster_dir)
  artefacts.check_compatible(cluster_dir, art.manifest, config=config, fingerprint=fingerprint,
                             spec=spec)
  return art


def load_importance(path: str, config: ModelConfig, fingerprint: Optional[str],
                    spec: CoreSpec) -> importance.GlobalImportance:
  """The importance file at `path`, checked against the model and the core
  settings (small arrays: before any weights load)."""
  loaded = importance.load(path)
  importance.check_compatible(path, loaded, config=config, fingerprint=fingerprint, spec=spec)
  return loaded


def load_predictor(predictor_dir: str, config: ModelConfig, fingerprint: Optional[str],
                   sparse_layers: Optional[Sequence[int]]) -> predictor.PredictorArtefacts:
  """The predictor artefacts in `predictor_dir`, their manifest checked
  against the model and the sparsified layers asked for (None: the ones it
  was trained for) before the arrays (or any model weights) load."""
  manifest = predictor.read_manifest(predictor_dir)
  predictor.check_compatible(predictor_dir, manifest, config=config, fingerprint=fingerprint,
                             sparse_layers=sparse_layers)
  return predictor.load(predictor_dir)


def predicted(settings: Mapping[str, Any], config: ModelConfig, fingerprint: Optional[str],
              beta: Optional[str] = None, name: str = "predictor") -> Predicted:
  """`--method=predictor`: settings["predictor_dir"]'s predictor choosing
  each token's top k = round(β·F) at the sparsified layers."""
  predictor_dir = settings.get("predictor_dir")
  if not predictor_dir:
    raise ValueError("--method=predictor needs --predictor_dir (built by "
                     "scripts/train_predictor.py)")
  spec = spec_for(settings, config, beta)
  if spec.shared or spec.blocks > 1:
    raise ValueError("--method=predictor chooses each token's own neurons: it has no shared or "
                     "per-device core sets (--core_sharing, --tp)")
  return Predicted(spec, load_predictor(predictor_dir, config, fingerprint, spec.sparse_layers),
                   name=name)


def policy_for(method: str, settings: Mapping[str, Any], config: ModelConfig, *,
               cluster_dir: Optional[str] = None, fingerprint: Optional[str] = None,
               beta: Optional[str] = None) -> CorePolicy:
  """The policy of a method name (`METHODS`) with the core settings; with
  settings["importance"] (a file), stability mixes it in at
  settings["importance_weight"]; predictor reads settings["predictor_dir"]."""
  check_method(method)
  if method != "similarity" and cluster_dir:
    raise ValueError(f"--cluster_dir is only used by --method=similarity, not {method}")
  if method != "predictor" and settings.get("predictor_dir"):
    raise ValueError(f"--predictor_dir is only used by --method=predictor, not {method}")
  importance_file = settings.get("importance")
  if importance_file and method != "stability":
    raise ValueError(f"--importance is only used by --method=stability, not {method}")
  if method == "dense":
    return Dense()
  if method == "predictor":
    return predicted(settings, config, fingerprint, beta)
  spec = spec_for(settings, config, beta)
  if method == "stability":
    if importance_file:
      weight = importance.check_weight(settings["importance_weight"])
      return GlobalMix(spec, load_importance(importance_file, config, fingerprint, spec), weight)
    return Stability(spec)
  if not cluster_dir:
    raise ValueError("--method=similarity needs --cluster_dir (built by scripts/cluster.py)")
  if spec.shared:
    raise ValueError("--core_sharing=shared is for --method=stability: similarity's sets are "
                     "the clusters'")
  if spec.blocks > 1:
    raise ValueError("similarity's cluster sets are chosen over all neurons: on a mesh use "
                     "--core_placement=global")
  return Similarity(load_clusters(cluster_dir, config, fingerprint, spec), top_m=spec.top_m)
