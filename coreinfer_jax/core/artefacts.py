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


def save_arrays(out_dir: str, prefix: str, tree: dict, manifest: dict) -> str:
  """Writes `tree` as a new orbax folder `prefix-<id>` under `out_dir`, then
  `manifest` (naming that folder as "artefacts") atomically, then deletes the
  older `prefix-*` folders; returns the new folder."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  name = f"{prefix}-{uuid.uuid4().hex[:12]}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, name), tree)
  checkpointer.wait_until_finished()
  files.write_json(os.path.join(out_dir, MANIFEST), dict(manifest, artefacts=name))
  for old in glob.glob(os.path.join(out_dir, f"{prefix}-*")):   # replaced, or orphaned by a crash
    if os.path.basename(old) != name:
      shutil.rmtree(old, ignore_errors=True)
  return os.path.join(out_dir, name)


def load_arrays(out_dir: str, manifest: dict) -> dict:
  """The tree of the orbax folder `manifest` names."""
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(out_dir),
                                                         manifest["artefacts"]))


def save(out_dir: str, art: ClusterArtefacts) -> str:
  """Writes `art` under `out_dir` atomically (see the module doc); returns the
  arrays' folder."""
  return save_arrays(out_dir, "clusters", _tree(art), dict(art.manifest, format=FORMAT))


def has_artefacts(out_dir: str) -> bool:
  return os.path.isfile(os.path.join(out_dir, MANIFEST))


def read_format_manifest(out_dir: str, form: str, what: str, built_by: str,
                         error: type = ValueError) -> dict:
  """`out_dir`'s manifest, checked to be of format `form` (else `error`);
  `what` and `built_by` name the artefacts and their command when it is missing."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} in {out_dir} ({MANIFEST} is missing): "
                            f"build them with {built_by}")
  manifest = files.read_json(path)
  found = manifest.get("format") if isinstance(manifest, dict) else None
  if found != form:
    raise error(f"{path}: format {found!r}, expected {form!r}")
  return manifest


def read_manifest(out_dir: str) -> dict:
  return read_format_manifest(out_dir, FORMAT, "cluster artefacts", "scripts/cluster.py",
                              ClusterMismatchError)


def load(out_dir: str) -> ClusterArtefacts:
  manifest = read_manifest(out_dir)
  tree = load_arrays(out_dir, manifest)
  num_layers = len(manifest["core"]["layer_k"])
  sets = tuple(None if f"layer_{i}" not in tree["sets"] else np.asarray(tree["sets"][f"layer_{i}"])
               for i in range(num_layers))
  return ClusterArtefacts(np.asarray(tree["centroids"]), sets, np.asarray(tree["assignments"]),
                          manifest)


def mismatch(out_dir: str, what: str, built, asked, *, artefacts: str = "cluster artefacts",
             error: type = ClusterMismatchError) -> ValueError:
  return error(f"{artefacts} in {out_dir} do not match: {what}: built with {built}, "
               f"asked for {asked}")


def _betas(spec: CoreSpec):
  """One β when uniform over the sparsified layers, else the per-layer list."""
  betas = [spec.layer_beta[i] for i in spec.sparse_layers]
  return betas[0] if len(set(betas)) == 1 else betas


def check_model(out_dir: str, manifest: dict, config: ModelConfig, fingerprint: Optional[str],
                **labels) -> None:
  """Raises the first difference of the model the artefacts were built for
  (`labels`: `mismatch`'s artefacts name and error class): number of layers,
  model and FFN width, checkpoint fingerprint."""
  built = manifest["model"]["config"]
  for field, what in (("num_layers", "number of layers"), ("hidden_size", "model width"),
                      ("intermediate_size", "FFN width (intermediate_size)")):
    if built[field] != getattr(config, field):
      raise mismatch(out_dir, what, built[field], getattr(config, field), **labels)
  if fingerprint is not None and manifest["model"]["fingerprint"] != fingerprint:
    raise mismatch(out_dir, "model fingerprint (another checkpoint)",
                   f"{manifest['model']['fingerprint']} ({manifest['model']['path']})",
                   fingerprint, **labels)


def check_compatible(out_dir: str, manifest: dict, *, config: ModelConfig,
                     fingerprint: Optional[str] = None, spec: Optional[CoreSpec] = None) -> None:
  """Raises `ClusterMismatchError` naming the first difference: the model
  (`check_model`), sparsified layers, β, scoring, α."""
  check_model(out_dir, manifest, config, fingerprint)
  if spec is None:
    return
  have = spec_from_record(manifest["core"])
  if have.sparse_layers != spec.sparse_layers:
    raise mismatch(out_dir, "sparsified layers", list(have.sparse_layers), list(spec.sparse_layers))
  if have.layer_beta != spec.layer_beta:
    raise mismatch(out_dir, "β (kept fraction)", _betas(have), _betas(spec))
  if have.scoring != spec.scoring:
    raise mismatch(out_dir, "scoring", have.scoring, spec.scoring)
  if have.alpha != spec.alpha:
    raise mismatch(out_dir, "α (token-wise fraction)", have.alpha, spec.alpha)
