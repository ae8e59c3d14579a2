"""Results tables and the quality-vs-bytes frontier: Markdown, and the most
FFN bytes each method family removes within a loss of dense."""

from __future__ import annotations

from typing import Dict, List, Sequence


def markdown_table(records: Sequence[dict], digits: int = 3) -> str:
  """Rows: methods (in first-seen order); columns: task/metric; plus the FFN fraction."""
  columns, rows = [], {}
  for r in records:
    row = rows.setdefault(r["method"], {"ffn": r["ffn_bytes_fraction"]})
    for metric, value in r["metrics"].items():
      column = f"{r['task']} {metric} (n={r['n']})"
      if column not in columns:
        columns.append(column)
      row[column] = value
  lines = ["| method | FFN bytes | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for name, row in rows.items():
    cells = [f"{row[c]:.{digits}f}" if c in row else "" for c in columns]
    lines.append(f"| {name} | {row['ffn']:.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


LOWER_IS_BETTER = frozenset({"perplexity"})


def most_removed_within(records: Sequence[dict], task: str, metric: str,
                        max_loss: float) -> List[dict]:
  """Per method family, the method removing the most FFN bytes whose `metric`
  on `task` is within `max_loss` of dense, relatively (perplexity may rise by
  at most max_loss·dense, other metrics fall by at most that): the "best β at
  the same loss" comparison. Sorted by bytes removed, most first; families
  with no method within the loss are left out."""
  on_task = [r for r in records if r["task"] == task and metric in r["metrics"]]
  dense = [r["metrics"][metric] for r in on_task if r["kind"] == "dense"]
  if not dense or dense[0] <= 0:
    raise ValueError(f"{task}:{metric} needs a dense result with a positive value to compare "
                     f"against (found {dense or 'none'})")
  sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
  best: Dict[str, dict] = {}
  for r in on_task:
    loss = sign * (r["metrics"][metric] / dense[0] - 1.0)
    removed = 1.0 - r["ffn_bytes_fraction"]
    if r["kind"] == "dense" or loss > max_loss:
      continue
    if r["family"] not in best or removed > best[r["family"]]["removed"]:
      best[r["family"]] = {"family": r["family"], "method": r["method"], "kind": r["kind"],
                           "removed": removed, metric: r["metrics"][metric], "loss": loss}
  return sorted(best.values(), key=lambda row: -row["removed"])


def within_loss_table(rows: Sequence[dict], metric: str) -> str:
  """`most_removed_within` as Markdown, each family's removal also as a multiple
  of the best uniform β's (the best "stability" family)."""
  uniform = max((row["removed"] for row in rows if row["kind"] == "stability"), default=0.0)
  lines = [f"| family | method | FFN bytes removed | {metric} | loss | × best uniform β |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    times = f"{row['removed'] / uniform:.2f}" if uniform > 0 else ""
    lines.append(f"| {row['family']} | {row['method']} | {row['removed']:.3f} | "
                 f"{row[metric]:.3f} | {row['loss']:+.1%} | {times} |")
  return "\n".join(lines) + "\n"
