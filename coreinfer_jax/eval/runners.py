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
from typing import Dict, List, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from coreinfer_jax.core.policy import CorePolicy, Predicted, Stability
from coreinfer_jax.core.predictor import PredictorArtefacts
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.eval import batched_windows, metrics, tasks
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.runtime.stopping import eos_ids


def stability_methods(config: ModelConfig, scorings: Sequence[str], betas: Sequence[float],
                      layer_sets: Sequence[str], alpha: float, blocks: Sequence[int] = (1,),
                      sharings: Sequence[str] = ("per_sequence",)) -> List[CorePolicy]:
  """One stability-guided policy per (layer set, β, scoring, neuron blocks,
  sharing); names carry "/blocks=N" for sets chosen in N > 1 blocks and
  "/shared" for batch-shared sets."""
  def suffix(n: int, sharing: str) -> str:
    return ("" if n == 1 else f"/blocks={n}") + ("" if sharing == "per_sequence" else f"/{sharing}")
  return [Stability(core_spec(config.num_layers, config.intermediate_size, beta=beta, alpha=alpha,
                              scoring=scoring, sparse_layers=layers, blocks=n, sharing=sharing),
                    name=f"stability/{scoring}/beta={beta:g}/{layers}{suffix(n, sharing)}",
                    family=f"stability/{scoring}/{layers}{suffix(n, sharing)}")
          for layers in layer_sets for beta in betas for scoring in scorings for n in blocks
          for sharing in sharings]


def predictor_methods(config: ModelConfig, art: PredictorArtefacts,
                      betas: Sequence[float]) -> List[CorePolicy]:
  """One predictor policy per β over the layers `art` was trained for (every
  policy shares `art`: the scorer runs them as rows of one batch)."""
  layers = ",".join(str(i) for i in art.layers)
  return [Predicted(core_spec(config.num_layers, config.intermediate_size, beta=beta,
                              sparse_layers=layers),
                    art, name=f"predictor/rank={art.rank}/beta={beta:g}") for beta in betas]


def beta_file_methods(config: ModelConfig, beta_file: str, label: str, scorings: Sequence[str],
                      alpha: float) -> List[CorePolicy]:
  """One policy per scoring with the per-layer β of a calibrated file."""
  return [Stability(core_spec(config.num_layers, config.intermediate_size, alpha=alpha,
                              scoring=scoring, beta_file=beta_file),
                    name=f"{label}/{scoring}", kind="beta_file")
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
  method: CorePolicy
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
                 len(windows), m.ffn_bytes_fraction(scorer.params), {"tokens": count})
          for m in scorer.methods]


def evaluate_batched_perplexity(scorer: ContinuationScorer, windows: Sequence[tasks.Window],
                                batch: int, task: str = "wikitext",
                                progress: bool = True) -> List[Result]:
  """Per-token perplexity with `batch` windows prefilled and decoded together
  (`eval.batched_windows`: a shared core set spans the batch)."""
  perplexity = batched_windows.batched_perplexity(scorer.params, scorer.config, scorer.methods,
                                                  windows, batch, scorer.cache_len, progress)
  count = sum(len(w.continuation) for w in windows)
  return [Result(task, m, {"perplexity": perplexity[m.name]}, len(windows),
                 m.ffn_bytes_fraction(scorer.params),
                 {"tokens": count, "window_batch": batch}) for m in scorer.methods]


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
                 m.ffn_bytes_fraction(scorer.params)) for m in scorer.methods]


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
                 m.ffn_bytes_fraction(scorer.params),
                 {"samples": [{"prompt": e.prompt[-200:], "output": o}
                              for e, o in zip(examples[:3], outputs[m.name][:3])]})
          for m in scorer.methods]
