"""PNG figures of the analyses (matplotlib, no display needed)."""

from __future__ import annotations

import os
from typing import Dict

import numpy as np

from coreinfer_jax import files


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")   # by `path`'s extension; none: png


def image_format(path: str) -> str:
  """The image format `path` asks for, refusing an extension not in FORMATS."""
  extension = os.path.splitext(path)[1][1:].lower()
  if extension and extension not in FORMATS:
    raise ValueError(f"{path}: a plot is written as {', '.join(FORMATS)} (by its extension), "
                     f"not .{extension}")
  return extension or "png"


def _save(plt, fig, path: str, **savefig_args) -> None:
  """Writes the figure atomically, in the format of `path`'s extension, then closes it."""
  image = image_format(path)
  files.write_atomically(path, lambda tmp: fig.savefig(tmp, format=image, **savefig_args))
  plt.close(fig)


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
  _save(plt, fig, path, dpi=120)


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
  _save(plt, fig, path, dpi=120)


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
  _save(plt, fig, path, dpi=120)


def frontier(records, path: str, title: str) -> None:
  """One panel per (task, metric): the metric against FFN bytes per decode
  token (sparse over dense), one curve per method family, dense as a line."""
  plt = _pyplot()
  panels = []
  for r in records:
    for metric in r["metrics"]:
      if (r["task"], metric) not in panels:
        panels.append((r["task"], metric))
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  families = list(dict.fromkeys(r["family"] for r in records if r["kind"] != "dense"))
  colours = dict(zip(families, plt.cm.tab20(np.linspace(0, 1, max(len(families), 1)))))
  for ax, (task, metric) in zip(axes.flat, panels):
    here = [r for r in records if r["task"] == task and metric in r["metrics"]]
    for r in here:
      if r["kind"] == "dense":
        ax.axhline(r["metrics"][metric], color="black", lw=1, ls="--", label="dense")
    for family in families:
      points = sorted((r["ffn_bytes_fraction"], r["metrics"][metric]) for r in here
                      if r["family"] == family)
      if points:
        x, y = zip(*points)
        ax.plot(x, y, marker="o", ms=3, lw=1, color=colours[family], label=family)
    n = here[0]["n"] if here else 0
    ax.set(xlabel="FFN bytes per decode token (fraction of dense)", ylabel=metric,
           title=f"{task} (n={n})")
    if metric == "perplexity":   # spans orders of magnitude across methods
      ax.set_yscale("log")
    ax.title.set_fontsize(9)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  for ax in axes.flat:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.suptitle(title)
  fig.tight_layout()
  # Below the panels, however many rows it takes; the tight bounding box keeps it.
  legend = fig.legend(handles, labels, loc="upper center", ncol=min(3, len(labels)), fontsize=7,
                      bbox_to_anchor=(0.5, 0))
  _save(plt, fig, path, dpi=110, bbox_inches="tight", bbox_extra_artists=[legend])
