"""Merge evaluate.py outputs (runs split over tasks or machines) into one JSON,
Markdown table and frontier plot.

  python scripts/merge_results.py --inputs=out/a.json,out/b.json \
      --metrics=wikitext:perplexity,piqa:acc_norm --json_out=docs/x.json --plot=docs/x.png

Each input keeps its settings (machine, limits, buckets) under "runs". A
(task, method) measured again (e.g. dense in every run) is kept once if it
agrees with the first measurement to 1e-3 (relative), and is an error if not.
"""

from __future__ import annotations

import os


from absl import flags

from coreinfer_jax import files
from coreinfer_jax.analysis import plots
from coreinfer_jax.cli import app, outputs
from coreinfer_jax.eval import frontier

flags.DEFINE_list("inputs", None, "evaluate.py JSON files")
flags.DEFINE_list("metrics", [], "task:metric columns of the table (default: every metric)")
flags.DEFINE_list("labels", [], "per input, where it ran (recorded beside its settings)")
flags.DEFINE_string("json_out", None, "merged JSON")
flags.DEFINE_string("markdown_out", None, "Markdown table (default: the JSON's path with .md)")
flags.DEFINE_string("plot", None, "frontier PNG")
flags.DEFINE_string("title", "quality vs FFN bytes", "plot title")
flags.DEFINE_float("plot_min_ffn", None, "plot only methods keeping at least this FFN fraction "
                   "(zooms in on the low-sparsity end; the table keeps every method)")
flags.DEFINE_string("within_loss", None, "task:metric:max_loss, e.g. wikitext:perplexity:0.05: "
                    "per family, the most FFN bytes removed within that relative loss of dense")
FLAGS = flags.FLAGS


def merge(paths, labels):
  runs, records, seen = [], [], {}
  for i, path in enumerate(paths):
    data = files.read_json(path)
    runs.append(dict(data["settings"], file=os.path.basename(path),
                     label=labels[i] if i < len(labels) else ""))
    for r in data["results"]:
      key = (r["task"], r["method"])
      if key in seen:
        first = seen[key]
        if r["n"] != first["n"] or any(
            abs(v - first["metrics"][m]) > 1e-3 * max(1.0, abs(v)) for m, v in r["metrics"].items()):
          raise ValueError(f"{key} in {path} disagrees with its first measurement: "
                           f"{r['metrics']} (n={r['n']}) vs {first['metrics']} (n={first['n']})")
        continue
      seen[key] = r
      records.append(r)
  return runs, records


def selected(records, metrics):
  if not metrics:
    return records
  wanted = [tuple(m.split(":", 1)) for m in metrics]
  out = []
  for r in records:
    keep = {metric: v for metric, v in r["metrics"].items() if (r["task"], metric) in wanted}
    if keep:
      out.append(dict(r, metrics=keep))
  return out


def within_loss_flag(text: str):
  parts = text.split(":")
  try:
    task, metric, max_loss = parts[0], parts[1], float(parts[2])
  except (IndexError, ValueError):
    raise ValueError(f"--within_loss {text!r}: expected task:metric:max_loss, e.g. "
                     "wikitext:perplexity:0.05") from None
  if len(parts) != 3 or max_loss < 0:
    raise ValueError(f"--within_loss {text!r}: expected task:metric:max_loss with max_loss >= 0")
  return task, metric, max_loss


def main(argv):
  del argv
  if not FLAGS.inputs or not FLAGS.json_out:
    raise ValueError("--inputs and --json_out are required")
  runs, records = merge(FLAGS.inputs, FLAGS.labels)
  merged = {"runs": runs, "results": records}
  table = frontier.markdown_table(selected(records, FLAGS.metrics))
  if FLAGS.within_loss:
    task, metric, max_loss = within_loss_flag(FLAGS.within_loss)
    rows = frontier.most_removed_within(records, task, metric, max_loss)
    merged["within_loss"] = {"task": task, "metric": metric, "max_loss": max_loss, "rows": rows}
    table += (f"\nMost FFN bytes removed within {max_loss:.0%} of dense {task} {metric}:\n\n"
              + frontier.within_loss_table(rows, metric))
  app.write_json(FLAGS.json_out, merged)
  files.write_text(outputs.markdown_path(FLAGS.markdown_out, FLAGS.json_out), table)
  print(table)
  if FLAGS.plot:
    plotted = [r for r in selected(records, FLAGS.metrics)
               if FLAGS.plot_min_ffn is None or r["ffn_bytes_fraction"] >= FLAGS.plot_min_ffn]
    plots.frontier(plotted, FLAGS.plot, FLAGS.title)


def entry():
  app.run(main, output_files=["json_out", "markdown_out"], output_plots=["plot"])
