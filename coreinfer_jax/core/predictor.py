"""Learned neuron predictors on disk: an orbax checkpoint of the weights plus a manifest.

  DIR/manifest.json        the model, the layers, the rank, the labels, the
                           data (hash), the training settings and results
  DIR/predictor-<id>/      orbax: layer_<i>/{down_RD, up_FR} per predicted layer

Written by `scripts/train_predictor.py` (`offline/predictor_training.py`)
the way cluster artefacts are (`core.artefacts.save_arrays`: arrays first,
then the manifest atomically). `check_compatible` refuses, in one line,
artefacts built for another model or another set of layers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from coreinfer_jax.core import artefacts
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.token_ffn import NeuronPredictor

FORMAT = "coreinfer_jax.predictor/1"


class PredictorMismatchError(ValueError):
  """Predictor artefacts built for another model or another set of layers."""


@dataclasses.dataclass(frozen=True)
class PredictorArtefacts:
  layer_predictors: Tuple[Optional[NeuronPredictor], ...]   # per model layer (None: none)
  manifest: dict

  @property
  def layers(self) -> Tuple[int, ...]:
    return tuple(i for i, p in enumerate(self.layer_predictors) if p is not None)

  @property
  def rank(self) -> int:
    return self.manifest["rank"]


def predictors_from_arrays(layers: Sequence[int], down_LRD: np.ndarray, up_LFR: np.ndarray,
                           num_layers: int) -> Tuple[Optional[NeuronPredictor], ...]:
  """Per model layer, the predictor of stacked weights (row j: `layers[j]`)."""
  by_layer = {layer: j for j, layer in enumerate(layers)}
  return tuple(None if i not in by_layer else
               NeuronPredictor(jnp.asarray(down_LRD[by_layer[i]]), jnp.asarray(up_LFR[by_layer[i]]))
               for i in range(num_layers))


def save(out_dir: str, art: PredictorArtefacts) -> str:
  tree = {f"layer_{i}": {"down_RD": np.asarray(p.down_RD), "up_FR": np.asarray(p.up_FR)}
          for i, p in enumerate(art.layer_predictors) if p is not None}
  return artefacts.save_arrays(out_dir, "predictor", tree, dict(art.manifest, format=FORMAT))


def read_manifest(out_dir: str) -> dict:
  return artefacts.read_format_manifest(out_dir, FORMAT, "predictor artefacts",
                                        "scripts/train_predictor.py", PredictorMismatchError)


def load(out_dir: str) -> PredictorArtefacts:
  manifest = read_manifest(out_dir)
  tree = artefacts.load_arrays(out_dir, manifest)
  num_layers = manifest["model"]["config"]["num_layers"]
  layers = manifest["layers"]
  return PredictorArtefacts(predictors_from_arrays(
      layers, np.stack([tree[f"layer_{i}"]["down_RD"] for i in layers]),
      np.stack([tree[f"layer_{i}"]["up_FR"] for i in layers]), num_layers), manifest)


def check_compatible(out_dir: str, manifest: dict, *, config: ModelConfig,
                     fingerprint: Optional[str], sparse_layers: Optional[Sequence[int]]) -> None:
  """Raises `PredictorMismatchError` naming the first difference: the model
  (`artefacts.check_model`), then the sparsified layers asked for (a
  predictor decodes exactly the layers it was trained for; None: its own)."""
  labels = dict(artefacts="predictor artefacts", error=PredictorMismatchError)
  artefacts.check_model(out_dir, manifest, config, fingerprint, **labels)
  if sparse_layers is not None and list(manifest["layers"]) != list(sparse_layers):
    raise artefacts.mismatch(out_dir, "sparsified layers (--sparse_layers)", manifest["layers"],
                             list(sparse_layers), **labels)
