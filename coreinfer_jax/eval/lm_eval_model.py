"""lm-evaluation-harness model `coreinfer_jax`: any lm-eval task, decoded sparsely.

  python -m coreinfer_jax.eval.lm_eval_model run --model coreinfer_jax \
      --model_args model=PATH_OR_NAME,method=stability,beta=0.4,scoring=griffin \
      --tasks coreinfer_piqa --include_path coreinfer_jax/eval/lm_eval_tasks \
      --metadata '{"data_dir": "DATA_DIR"}'

(`python -m coreinfer_jax.eval.lm_eval_model` is lm-eval's own command line
with this model registered; importing this module registers it for
`lm_eval.simple_evaluate` too. From Python, `CoreInferLM(policy=...)` takes
any `core.policy.CorePolicy` instead of the method settings.)

- `loglikelihood`: the context is prefilled densely and chooses the core
  neurons; the continuation is scored as sparse decoding would
  (`scoring.ContinuationScorer`). Requests sharing a context (multiple choice)
  share one prefill.
- `loglikelihood_rolling`: lm-eval's rolling windows of `rolling_window`
  tokens, each window's first part (up to `rolling_context` tokens) prefilled
  as its context, the rest scored sparsely; the first window's context is the
  prefix token alone, as a one-token prompt.
- `generate_until`: greedy `Generator` decoding, stopped at `until`.
"""

from __future__ import annotations

import collections
from typing import List, Optional, Tuple

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from coreinfer_jax import checkpoint
from coreinfer_jax.core import methods
from coreinfer_jax.core.policy import CorePolicy
from coreinfer_jax.eval.runners import encode_pair
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.runtime.batching import resolve_dtype
from coreinfer_jax.runtime.generator import Generator


@register_model("coreinfer_jax")
class CoreInferLM(LM):
  def __init__(self, model: Optional[str] = None, method: str = "dense", beta="0.4",
               alpha: float = 0.2, scoring: str = "signed", sparse_layers: str = "paper",
               beta_file: Optional[str] = None, cluster_dir: Optional[str] = None,
               cache_len: int = 1024, batch_size=8, dtype: str = "auto",
               rolling_window: int = 512, rolling_context: int = 256,
               policy: Optional[CorePolicy] = None, **unused):
    super().__init__()
    dtype = resolve_dtype(dtype)
    model = checkpoint.model_path(model)
    config = checkpoint.load_config(model)
    if policy is None:
      settings = dict(beta=str(beta), alpha=float(alpha), scoring=scoring,
                      sparse_layers=str(sparse_layers), beta_file=beta_file)
      policy = methods.policy_for(
          method, settings, config, cluster_dir=cluster_dir,
          fingerprint=checkpoint.fingerprint(model))
    loaded = checkpoint.load_model(model, dtype)
    if loaded.tokenizer is None:
      raise ValueError(f"{loaded.path} has no tokenizer")
    self.tokenizer = loaded.tokenizer
    self.method = policy
    self.scorer = ContinuationScorer(loaded.config, loaded.params, [policy],
                                     cache_len=int(cache_len))
    self.generator = Generator(loaded.config, loaded.params, loaded.tokenizer,
                               cache_len=int(cache_len), policy=policy)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    self.cache_len = int(cache_len)
    self.rolling_window, self.rolling_context = int(rolling_window), int(rolling_context)
    eos = loaded.config.eos_token_ids
    self.prefix_token = (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                         else (eos[0] if eos else self.tokenizer.eos_token_id))

  def _scores(self, context_ids: List[int], continuations: List[List[int]]):
    return self.scorer.score(context_ids, continuations)[self.method.name]

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
    by_context = collections.defaultdict(list)   # one prefill per distinct context
    for i, request in enumerate(requests):
      by_context[request.args[0]].append(i)
    out: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    for context, indices in tqdm(by_context.items(), disable=disable_tqdm, desc="loglikelihood"):
      pairs = [encode_pair(self.tokenizer, context, requests[i].args[1]) for i in indices]
      context_ids = pairs[0][0] or [self.prefix_token]
      s = self._scores(context_ids, [ids for _, ids in pairs])
      for j, i in enumerate(indices):
        out[i] = (float(s.logprob_sums[j]), bool(s.greedy[j]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
    out = []
    for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
      ids = list(self.tokenizer(request.args[0])["input_ids"])
      total = 0.0
      for window in lm_utils.get_rolling_token_windows(ids, self.prefix_token, self.rolling_window,
                                                       self.rolling_context):
        context_ids, continuation = lm_utils.make_disjoint_window(window)
        total += float(self._scores(context_ids, [continuation]).logprob_sums[0])
      out.append(total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
    groups = collections.defaultdict(list)
    for i, request in enumerate(requests):
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) > 0:
        raise ValueError("coreinfer_jax's lm-eval model decodes greedily (do_sample=False)")
      until = kwargs.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      groups[(until, int(kwargs.get("max_gen_toks", 256)))].append(i)
    out: List[Optional[str]] = [None] * len(requests)
    for (until, max_new), indices in tqdm(groups.items(), disable=disable_tqdm, desc="generate_until"):
      room = self.cache_len - max_new
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start:start + self.batch_size]
        prompts = [self.generator.encode(requests[i].args[0])[-room:] for i in batch]
        results, _ = self.generator.generate_ids(prompts, max_new, stop_strings=until)
        for i, r in zip(batch, results):
          out[i] = r.text
    return out


if __name__ == "__main__":
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()
