"""PNG figures of the analyses (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Dict

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def stability(result: Dict, path: str, title: str) -> None:
  """Overlap of each decode token's core neurons with the sentence's core set,
  vs decode step, one line per layer, with the random-set baseline."""
  plt = _pyplot()
  overlap_SL = np.asarray(result["overlap_by_step_layer"])
  random_SL = np.asarray(result["random_by_step_layer"])
  steps = np.arange(1, overlap_SL.shape[0] + 1)
  fig, ax = plt.subplots(figsize=(8, 4.8))
  colours = plt.cm.viridis(np.linspace(0, 1, overlap_SL.shape[1]))
  for layer, colour in enumerate(colours):
    ax.plot(steps, overlap_SL[:, layer], color=colour, lw=1.2)
  ax.plot(steps, random_SL.mean(1), color="grey", ls="--", lw=1.5, label="random set of size k (mean)")
  sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, overlap_SL.shape[1] - 1))
  fig.colorbar(sm, ax=ax, label="layer")
  ax.set(xlabel="decode step", ylabel="token's core neurons in the sentence's core set",
         ylim=(0, 1), title=title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def similarity(result: Dict, focus: Dict, path: str, title: str) -> None:
  """Left: Jaccard of pairs with the same label vs different labels at the
  focus layer. Middle: Jaccard vs each continuous relation. Right: Spearman
  per layer."""
  plt = _pyplot()
  relations = [name for name in focus if name not in ("jaccard", "same_label")]
  fig, axes = plt.subplots(1, 2 + len(relations), figsize=(5 * (2 + len(relations)), 4.5))
  jac = focus["jaccard"]
  ax = axes[0]
  if focus["same_label"] is not None:
    same = focus["same_label"] == 1
    bins = np.linspace(jac.min(), jac.max(), 40)
    ax.hist(jac[~same], bins=bins, density=True, alpha=0.6, label="different category")
    ax.hist(jac[same], bins=bins, density=True, alpha=0.6, label="same category")
    ax.legend()
  else:
    ax.hist(jac, bins=40)
  ax.set(xlabel=f"Jaccard of core sets (layer {result['focus_layer']})", ylabel="density")
  for ax, name in zip(axes[1:], relations):
    ax.scatter(focus[name], jac, s=2, alpha=0.3)
    rho = result["focus"][name]["spearman"]
    ax.set(xlabel=name.replace("_", " "), ylabel="Jaccard", title=f"Spearman {rho:.3f}")
  ax = axes[-1]
  layers = [row["layer"] for row in result["layers"]]
  for name in (["same_label"] if focus["same_label"] is not None else []) + relations:
    ax.plot(layers, [row[name]["spearman"] for row in result["layers"]], marker="o", ms=3,
            label=name.replace("_", " "))
  ax.axhline(0, color="grey", lw=0.8)
  ax.set(xlabel="layer", ylabel="Spearman with Jaccard")
  ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def held_out(result: Dict, path: str, title: str) -> None:
  """Per layer: held-out prompts' overlap with their cluster's set, with a
  random other cluster's set, and with a random set."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  layers = result["layers"]
  for key, label in (("own_cluster_by_layer", "nearest cluster's set"),
                     ("other_cluster_by_layer", "a random other cluster's set"),
                     ("random_set_by_layer", "random set (k/F)")):
    ax.plot(layers, result[key], marker="o", ms=3, label=label)
  ax.set(xlabel="layer", ylabel="overlap with the prompt's own core set", ylim=(0, 1), title=title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
