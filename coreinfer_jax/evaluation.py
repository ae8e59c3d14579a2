"""Quality under sparsity: every task kind for several methods at once.

- perplexity: each window's context is prefilled densely (choosing the core
  neurons) and its continuation scored as decoding would (`scoring`); per-token
  perplexity and the mean KL divergence of the dense model's next-token
  distribution to the method's.
- multiple choice: the context chooses the core neurons; every choice is scored
  sparsely; lm-eval's acc and acc_norm.
- generation: greedy `Generator` decoding per method (sparse after the dense
  prefill), stopped at the task's stop strings; the task's metrics.

One dense prefill per context serves every method of the log-likelihood tasks.
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
from coreinfer_jax.generation import Generator
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
  for e in tqdm(examples, desc=task, disable=not progress):
    pairs = [encode_pair(tokenizer, e.context, choice) for choice in e.choices]
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


def generate_outputs(generator: Generator, task: tasks.Task, examples: Sequence[tasks.GenerationExample],
                     batch_size: int, desc: str = "", progress: bool = True) -> List[str]:
  """Greedy completions, `batch_size` prompts at a time (a short last batch is
  padded with copies, so every batch runs the same executables)."""
  outputs: List[str] = []
  prompt_ids = [generator.encode(e.prompt) for e in examples]
  for start in tqdm(range(0, len(prompt_ids), batch_size), desc=desc or task.name, disable=not progress):
    batch = prompt_ids[start:start + batch_size]
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    results, _ = generator.generate_ids(padded, task.max_new_tokens, stop_strings=task.until)
    outputs.extend(r.text for r in results[:len(batch)])
  return outputs


def evaluate_generation(generators: Dict[str, Generator], methods: Sequence[Method], task: tasks.Task,
                        examples: Sequence[tasks.GenerationExample], batch_size: int,
                        params: ModelParams, progress: bool = True) -> List[Result]:
  results = []
  for m in methods:
    outputs = generate_outputs(generators[m.name], task, examples, batch_size,
                               desc=f"{task.name} {m.name}", progress=progress)
    results.append(Result(task.name, m, generation_metrics(task, examples, outputs), len(examples),
                          spec_ffn_bytes_fraction(params, m.spec),
                          {"samples": [{"prompt": e.prompt[-200:], "output": o}
                                       for e, o in zip(examples[:3], outputs[:3])]}))
  return results


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
