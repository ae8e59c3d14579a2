"""Quality under sparsity: every task kind for several methods at once.

- perplexity: each window's context is prefilled densely (choosing the core
  neurons) and its continuation scored as decoding would (`scoring`); per-token
  perplexity and the mean KL divergence of the dense model's next-token
  distribution to the method's.
- multiple choice: the context chooses the core neurons; every choice is scored
  sparsely; lm-eval's acc and acc_norm.
- generation: greedy decoding (sparse after the dense prefill), every method a
  row of one batch (`ContinuationScorer.generate`), stopped at the task's stop
  strings; the task's metrics.

One dense prefill per context or prompt serves every method.
Each result records its metric values, n and the method's settings, with
`ffn_bytes_fraction`: FFN weight bytes per decode token, sparse over dense.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from coreinfer_jax import gather, metrics, tasks
from coreinfer_jax.config import ModelConfig
from coreinfer_jax.core import CoreSpec, core_spec
from coreinfer_jax.generation import eos_ids
from coreinfer_jax.params import ModelParams
from coreinfer_jax.scoring import ContinuationScorer, Method


def spec_ffn_bytes_fraction(params: ModelParams, spec: Optional[CoreSpec]) -> float:
  """FFN weight bytes per decode token under `spec`, over dense (from shapes alone)."""
  if spec is None:
    return 1.0
  core = tuple(None if k is None else jax.ShapeDtypeStruct((k,), jnp.int32) for k in spec.layer_k)
  compact = jax.eval_shape(gather.gather_core, params, core)
  return gather.ffn_bytes_fraction(params, gather.with_compact_ffn(params, compact))


def stability_methods(config: ModelConfig, scorings: Sequence[str], betas: Sequence[float],
                      layer_sets: Sequence[str], alpha: float) -> List[Method]:
  """One stability-guided method per (layer set, β, scoring)."""
  return [Method(f"stability/{scoring}/beta={beta:g}/{layers}",
                 core_spec(config.num_layers, config.intermediate_size, beta=beta, alpha=alpha,
                           scoring=scoring, sparse_layers=layers), kind="stability",
                 family=f"stability/{scoring}/{layers}")
          for layers in layer_sets for beta in betas for scoring in scorings]


def beta_file_methods(config: ModelConfig, beta_file: str, label: str, scorings: Sequence[str],
                      alpha: float) -> List[Method]:
  return [Method(f"{label}/{scoring}",
                 core_spec(config.num_layers, config.intermediate_size, alpha=alpha,
                           scoring=scoring, beta_file=beta_file), kind="beta_file")
          for scoring in scorings]


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
  """lm-eval's split: trailing spaces of the context move to the continuation;
  the continuation's tokens are those of context + continuation after the
  context's own tokens."""
  spaces = len(context) - len(context.rstrip(" "))
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = list(tokenizer(context)["input_ids"])
  whole = list(tokenizer(context + continuation)["input_ids"])
  return context_ids, whole[len(context_ids):]


@dataclasses.dataclass
class Result:
  task: str
  method: Method
  metrics: Dict[str, float]
  n: int
  ffn_bytes_fraction: float
  extra: Dict = dataclasses.field(default_factory=dict)

  def record(self) -> dict:
    return dict(task=self.task, **self.method.summary(), metrics=self.metrics, n=self.n,
                ffn_bytes_fraction=self.ffn_bytes_fraction, **self.extra)


def evaluate_perplexity(scorer: ContinuationScorer, windows: Sequence[tasks.Window], task: str = "wikitext",
                        progress: bool = True) -> List[Result]:
  """Per-token perplexity of the continuations and mean KL to dense per token."""
  nll = {m.name: 0.0 for m in scorer.methods}
  kl = {m.name: 0.0 for m in scorer.methods}
  count = 0
  for w in tqdm(windows, desc=task, disable=not progress):
    scores = scorer.score(w.context, [w.continuation], with_kl=True)
    for name, s in scores.items():
      nll[name] -= float(s.logprob_sums[0])
      kl[name] += float(s.token_kl[0].astype(np.float64).sum())
    count += len(w.continuation)
  return [Result(task, m, {"perplexity": math.exp(nll[m.name] / count), "kl": kl[m.name] / count},
                 len(windows), spec_ffn_bytes_fraction(scorer.params, m.spec), {"tokens": count}) for m in scorer.methods]


def evaluate_choices(scorer: ContinuationScorer, tokenizer, examples: Sequence[tasks.ChoiceExample],
                     task: str, progress: bool = True) -> List[Result]:
  per_example = {m.name: [] for m in scorer.methods}
  encoded = [[encode_pair(tokenizer, e.context, choice) for choice in e.choices] for e in examples]
  for i, pairs in enumerate(encoded):   # every example fits, or nothing runs
    try:
      scorer.layout(len(pairs[0][0]), max(len(ids) for _, ids in pairs))
    except ValueError as err:
      raise ValueError(f"{task} example {i} (checked before scoring any): {err}") from None
  for e, pairs in zip(tqdm(examples, desc=task, disable=not progress), encoded):
    context_ids = pairs[0][0]
    scores = scorer.score(context_ids, [ids for _, ids in pairs])
    for name, s in scores.items():
      per_example[name].append(metrics.multiple_choice(s.logprob_sums, e.choices, e.gold))
  return [Result(task, m, metrics.mean_metrics(per_example[m.name]), len(examples),
                 spec_ffn_bytes_fraction(scorer.params, m.spec)) for m in scorer.methods]


def generation_metrics(task: tasks.Task, examples: Sequence[tasks.GenerationExample],
                       outputs: Sequence[str]) -> Dict[str, float]:
  if task.name == "truthfulqa_gen":
    return metrics.mean_metrics([metrics.truthfulqa(o, e.references, e.incorrect)
                                 for o, e in zip(outputs, examples)])
  if task.name == "squad":
    return metrics.mean_metrics([metrics.squad(o.strip(), e.references) for o, e in zip(outputs, examples)])
  if task.name == "xsum":
    return metrics.rouge([o.strip() for o in outputs], [e.references[0] for e in examples])
  if task.name == "wmt22_de_en":
    return metrics.translation([o.strip() for o in outputs], [e.references[0] for e in examples])
  raise ValueError(f"{task.name} is not a generation task")


def generate_outputs(scorer: ContinuationScorer, tokenizer, task: tasks.Task,
                     examples: Sequence[tasks.GenerationExample],
                     progress: bool = True) -> Dict[str, List[str]]:
  """Per method name, the greedy completion of each example's prompt."""
  outputs: Dict[str, List[str]] = {m.name: [] for m in scorer.methods}
  eos = eos_ids(scorer.config, tokenizer)
  for e in tqdm(examples, desc=task.name, disable=not progress):
    completions = scorer.generate(list(tokenizer(e.prompt)["input_ids"]), task.max_new_tokens,
                                  eos_ids=eos, stop_strings=task.until, tokenizer=tokenizer)
    for name, r in completions.items():
      outputs[name].append(r.text)
  return outputs


def evaluate_generation(scorer: ContinuationScorer, tokenizer, task: tasks.Task,
                        examples: Sequence[tasks.GenerationExample],
                        progress: bool = True) -> List[Result]:
  outputs = generate_outputs(scorer, tokenizer, task, examples, progress)
  return [Result(task.name, m, generation_metrics(task, examples, outputs[m.name]), len(examples),
                 spec_ffn_bytes_fraction(scorer.params, m.spec),
                 {"samples": [{"prompt": e.prompt[-200:], "output": o}
                              for e, o in zip(examples[:3], outputs[m.name][:3])]})
          for m in scorer.methods]


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
