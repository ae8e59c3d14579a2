"""Model-global neuron importance (as GLASS, arXiv 2508.14302): computed once
from calibration text, saved, and mixed with each prompt's own ranking keys.

A layer's global importance is the mean, over calibration texts, of each
text's share of the selection's primary ranking key
(`selection.core_statistics`: token-wise core counts, or GRIFFIN's sum of
normalised squares): float32 [F], summing to 1. `selection.mix_importance`
ranks a prompt's neurons by (1 − w) · its own share + w · that prior, so
w = 0 is the prompt's own set and w = 1 one static set for every prompt.

On disk it is one `.npz` file, written atomically: `layer_<i>` float32 [F]
for each layer computed, and `manifest` (JSON text: the model, the scoring
and α, the data). `check_compatible` refuses, in one line, a file built for
another model, scoring, α or set of layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from coreinfer_jax import files
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.config import ModelConfig

FORMAT = "coreinfer_jax.importance/1"


class ImportanceMismatchError(ValueError):
  """An importance file built for another model or other core settings."""


@dataclasses.dataclass(frozen=True)
class GlobalImportance:
  layer_importance: Tuple[Optional[np.ndarray], ...]   # per model layer float32 [F] (None: none)
  manifest: dict

  @property
  def layers(self) -> Tuple[int, ...]:
    return tuple(i for i, v in enumerate(self.layer_importance) if v is not None)


def from_statistics(primary_NF: Dict[int, np.ndarray],
                    num_layers: int) -> Tuple[Optional[np.ndarray], ...]:
  """Per model layer, the mean over texts of each text's share of the primary
  key (`primary_NF`: per computed layer, one row per text)."""
  out = []
  for layer in range(num_layers):
    if layer not in primary_NF:
      out.append(None)
      continue
    primary = primary_NF[layer].astype(np.float64)
    shares = primary / np.maximum(primary.sum(axis=1, keepdims=True), 1e-30)
    out.append(shares.mean(axis=0).astype(np.float32))
  return tuple(out)


def save(path: str, importance: GlobalImportance) -> None:
  arrays = {f"layer_{i}": importance.layer_importance[i] for i in importance.layers}
  arrays["manifest"] = np.asarray(json.dumps(dict(importance.manifest, format=FORMAT)))
  files.write_npz(path, arrays)


def load(path: str) -> GlobalImportance:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no importance file {path}: build it with scripts/importance.py")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = dict(data)
  except (OSError, ValueError) as e:
    raise ImportanceMismatchError(f"{path}: not an importance file ({e})") from None
  manifest = json.loads(str(arrays.pop("manifest", "{}")))
  if manifest.get("format") != FORMAT:
    raise ImportanceMismatchError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  num_layers = manifest["model"]["config"]["num_layers"]
  return GlobalImportance(tuple(arrays.get(f"layer_{i}") for i in range(num_layers)), manifest)


def _mismatch(path: str, what: str, built, asked) -> ImportanceMismatchError:
  return ImportanceMismatchError(f"importance file {path} does not match: {what}: built with "
                                 f"{built}, asked for {asked}")


def check_compatible(path: str, importance: GlobalImportance, *, config: ModelConfig,
                     fingerprint: Optional[str], spec: CoreSpec) -> None:
  """Raises `ImportanceMismatchError` naming the first difference: number of
  layers, FFN width, model fingerprint, scoring, α, a sparsified layer
  without importance."""
  model = importance.manifest["model"]
  for field, what in (("num_layers", "number of layers"),
                      ("intermediate_size", "FFN width (intermediate_size)")):
    if model["config"][field] != getattr(config, field):
      raise _mismatch(path, what, model["config"][field], getattr(config, field))
  if fingerprint is not None and model["fingerprint"] != fingerprint:
    raise _mismatch(path, "model fingerprint (another checkpoint)",
                    f"{model['fingerprint']} ({model['path']})", fingerprint)
  core = importance.manifest["core"]
  if core["scoring"] != spec.scoring:
    raise _mismatch(path, "scoring", core["scoring"], spec.scoring)
  if core["alpha"] != spec.alpha:
    raise _mismatch(path, "α (token-wise fraction)", core["alpha"], spec.alpha)
  missing = sorted(set(spec.sparse_layers) - set(importance.layers))
  if missing:
    raise _mismatch(path, "sparsified layers", list(importance.layers), list(spec.sparse_layers))


def check_weight(weight: float) -> float:
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"importance weight must be in [0, 1], got {weight}")
  return float(weight)


def parse_weights(values: Sequence[str]) -> Tuple[float, ...]:
  """A flag's list of mix weights, each checked."""
  try:
    weights = [float(v) for v in values]
  except ValueError:
    raise ValueError(f"importance weights {list(values)}: expected numbers in [0, 1]") from None
  return tuple(check_weight(w) for w in weights)
