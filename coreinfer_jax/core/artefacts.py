"""Cluster artefacts on disk: an orbax checkpoint of the arrays plus a JSON manifest.

  DIR/manifest.json        what the arrays were built from, and which folder holds them
  DIR/clusters-<id>/       orbax: centroids float32 [C, F], assignments int32 [N],
                           sets/layer_<i> int32 [C, k_i] per sparsified layer i

Saving writes the new orbax folder first (orbax itself commits it by a rename),
then replaces `manifest.json` atomically, then deletes older folders: a
run interrupted at any point leaves a manifest that names complete arrays.
Loading checks the manifest against the model and the core settings asked for
and raises `ClusterMismatchError` naming whatever differs.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import uuid
from typing import Optional, Tuple

import numpy as np

from coreinfer_jax import files
from coreinfer_jax.core.spec import CoreSpec
from coreinfer_jax.model.config import ModelConfig

FORMAT = "coreinfer_jax.clusters/1"
MANIFEST = "manifest.json"


class ClusterMismatchError(ValueError):
  """Artefacts built for another model or other core settings."""


@dataclasses.dataclass(frozen=True)
class ClusterArtefacts:
  centroids_CF: np.ndarray                        # float32 [C, F]
  layer_sets: Tuple[Optional[np.ndarray], ...]    # per model layer int32 [C, k], None: dense
  assignments_N: np.ndarray                       # int32 [N]: cluster of each clustered text
  manifest: dict

  @property
  def num_clusters(self) -> int:
    return self.centroids_CF.shape[0]

  @property
  def cluster_layer(self) -> int:
    return self.manifest["cluster_layer"]

  @property
  def cluster_k(self) -> int:
    return self.manifest["cluster_k"]

  @property
  def spec(self) -> CoreSpec:
    """The core settings the per-layer sets were built with."""
    return spec_from_record(self.manifest["core"])


def spec_record(spec: CoreSpec) -> dict:
  return dataclasses.asdict(spec)


def spec_from_record(record: dict) -> CoreSpec:
  return CoreSpec(record["scoring"], record["alpha"], tuple(record["layer_k"]),
                  tuple(record["layer_beta"]))


def _tree(art: ClusterArtefacts) -> dict:
  sets = {f"layer_{i}": s for i, s in enumerate(art.layer_sets) if s is not None}
  return {"centroids": art.centroids_CF, "assignments": art.assignments_N, "sets": sets}


def save(out_dir: str, art: ClusterArtefacts) -> str:
  """Writes `art` under `out_dir` atomically (see the module doc); returns the
  arrays' folder."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  name = f"clusters-{uuid.uuid4().hex[:12]}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, name), _tree(art))
  checkpointer.wait_until_finished()
  files.write_json(os.path.join(out_dir, MANIFEST), dict(art.manifest, format=FORMAT, artefacts=name))
  for old in glob.glob(os.path.join(out_dir, "clusters-*")):   # replaced, or orphaned by a crash
    if os.path.basename(old) != name:
      shutil.rmtree(old, ignore_errors=True)
  return os.path.join(out_dir, name)


def has_artefacts(out_dir: str) -> bool:
  return os.path.isfile(os.path.join(out_dir, MANIFEST))


def read_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no cluster artefacts in {out_dir} ({MANIFEST} is missing): "
                            f"build them with scripts/cluster.py")
  manifest = files.read_json(path)
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found != FORMAT:
    raise ClusterMismatchError(f"{path}: format {found!r}, expected {FORMAT!r}")
  return manifest


def load(out_dir: str) -> ClusterArtefacts:
  import orbax.checkpoint as ocp
  manifest = read_manifest(out_dir)
  tree = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(out_dir),
                                                         manifest["artefacts"]))
  num_layers = len(manifest["core"]["layer_k"])
  sets = tuple(None if f"layer_{i}" not in tree["sets"] else np.asarray(tree["sets"][f"layer_{i}"])
               for i in range(num_layers))
  return ClusterArtefacts(np.asarray(tree["centroids"]), sets, np.asarray(tree["assignments"]),
                          manifest)


def _mismatch(out_dir: str, what: str, built, asked) -> ClusterMismatchError:
  return ClusterMismatchError(f"cluster artefacts in {out_dir} do not match: {what}: built with "
                              f"{built}, asked for {asked}")


def _betas(spec: CoreSpec):
  """One β when uniform over the sparsified layers, else the per-layer list."""
  betas = [spec.layer_beta[i] for i in spec.sparse_layers]
  return betas[0] if len(set(betas)) == 1 else betas


def check_compatible(out_dir: str, manifest: dict, *, config: ModelConfig,
                     fingerprint: Optional[str] = None, spec: Optional[CoreSpec] = None) -> None:
  """Raises `ClusterMismatchError` naming the first difference: number of
  layers, FFN width, model fingerprint, sparsified layers, β, scoring, α."""
  built = manifest["model"]["config"]
  for field, what in (("num_layers", "number of layers"),
                      ("intermediate_size", "FFN width (intermediate_size)")):
    if built[field] != getattr(config, field):
      raise _mismatch(out_dir, what, built[field], getattr(config, field))
  if fingerprint is not None and manifest["model"]["fingerprint"] != fingerprint:
    raise _mismatch(out_dir, "model fingerprint (another checkpoint)",
                    f"{manifest['model']['fingerprint']} ({manifest['model']['path']})", fingerprint)
  if spec is None:
    return
  have = spec_from_record(manifest["core"])
  if have.sparse_layers != spec.sparse_layers:
    raise _mismatch(out_dir, "sparsified layers", list(have.sparse_layers), list(spec.sparse_layers))
  if have.layer_beta != spec.layer_beta:
    raise _mismatch(out_dir, "β (kept fraction)", _betas(have), _betas(spec))
  if have.scoring != spec.scoring:
    raise _mismatch(out_dir, "scoring", have.scoring, spec.scoring)
  if have.alpha != spec.alpha:
    raise _mismatch(out_dir, "α (token-wise fraction)", have.alpha, spec.alpha)
