"""lm-evaluation-harness model `coreinfer_jax`: any lm-eval task, decoded sparsely.

  python -m coreinfer_jax.eval.lm_eval_model run --model coreinfer_jax \
      --model_args model=PATH_OR_NAME,method=stability,beta=0.4,scoring=griffin \
      --tasks coreinfer_piqa --include_path coreinfer_jax/eval/lm_eval_tasks \
      --metadata '{"data_dir": "DATA_DIR"}'

(`python -m coreinfer_jax.eval.lm_eval_model` is lm-eval's own command line
with this model registered; importing this module registers it for
`lm_eval.simple_evaluate` too. From Python, `CoreInferLM(policy=...)` takes
any `core.policy.CorePolicy` instead of the method settings.)

The model_args (`ModelArgs`) are all checked before any weights load, with
the command line's checks (`core.methods`, `checkpoint.load_config`): a bad
one raises `ModelArgsError`, one line naming it. From the command line above
they are checked before lm-eval indexes its tasks, and a bad one is printed as
that line alone (exit status 2) rather than lm-eval's traceback.

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
import contextlib
import dataclasses
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from coreinfer_jax import checkpoint
from coreinfer_jax.core import methods
from coreinfer_jax.core.policy import CorePolicy
from coreinfer_jax.eval.runners import encode_pair
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.runtime.batching import resolve_dtype
from coreinfer_jax.runtime.generator import Generator

MODEL_NAME = "coreinfer_jax"
DEFAULT_BATCH_SIZE = 8
# What lm-eval passes to every model besides its model_args; accepted and not
# used (JAX runs where it is installed to run).
LM_EVAL_ARGS = ("device", "max_batch_size", "trust_remote_code")
# What lm-eval's command line always passes itself (`--batch_size`, `--device`):
# in model_args as well, Python refuses the repeated keyword with a traceback.
LM_EVAL_CLI_ARGS = ("batch_size", "device")
# The core settings in the order they are checked, each together with those
# before it over the defaults (β's count depends on sparse_layers; beta_file
# replaces both), so that an error names the setting that caused it.
SPEC_CHECK_ORDER = ("scoring", "alpha", "sparse_layers", "beta", "beta_file")
EXIT_USAGE = 2   # a bad argument, as the package's commands and argparse


class ModelArgsError(ValueError):
  """A bad model_arg, found before any weights load: one line naming it."""

  def __init__(self, name: str, value: Any, reason: Any):
    super().__init__(f"coreinfer model_args: {name}={value}: {reason}")


def _text(value: Any) -> str:
  if not isinstance(value, str):
    raise ValueError(f"expected text, got {type(value).__name__}")
  return value


def _optional_text(value: Any) -> Optional[str]:
  return None if value is None else _text(value)


def _optional_path(value: Any) -> Optional[str]:
  return None if value is None else os.fspath(value)


def _number(value: Any) -> float:
  if not isinstance(value, bool):
    with contextlib.suppress(TypeError, ValueError):
      return float(value)
  raise ValueError("expected a number")


def _positive_int(value: Any) -> int:
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError("expected a positive integer")
  return value


def _batch_size(value: Any) -> int:
  """A positive integer; lm-eval's "auto" or "auto:N" is the default."""
  if isinstance(value, str) and value.startswith("auto"):
    return DEFAULT_BATCH_SIZE
  return _positive_int(value)


def _comma_list(value: Any) -> str:
  """A flag's text ("0.5,0.4", "5:27"): lm-eval passes a number, a list or text."""
  return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _arg(default: Any, convert) -> Any:
  return dataclasses.field(default=default, metadata={"convert": convert})


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """The model_args, each converted from what lm-eval passes (`check_model_args`)."""
  model: Optional[str] = _arg(None, _optional_path)   # a path or a named model (None: default)
  method: str = _arg("dense", _text)                  # `methods.METHODS`
  beta: str = _arg("0.4", _comma_list)                # the core settings (`methods.spec_for`)
  alpha: float = _arg(0.2, _number)
  scoring: str = _arg("signed", _text)
  sparse_layers: str = _arg("paper", _comma_list)
  beta_file: Optional[str] = _arg(None, _optional_text)
  cluster_dir: Optional[str] = _arg(None, _optional_text)   # method=similarity's artefacts
  predictor_dir: Optional[str] = _arg(None, _optional_text)   # method=predictor's artefacts
  cache_len: int = _arg(1024, _positive_int)
  batch_size: int = _arg(DEFAULT_BATCH_SIZE, _batch_size)   # generate_until's batch
  dtype: str = _arg("auto", _text)                    # `runtime.batching.resolve_dtype`
  rolling_window: int = _arg(512, _positive_int)
  rolling_context: int = _arg(256, _positive_int)


@dataclasses.dataclass(frozen=True)
class CheckedModelArgs:
  args: ModelArgs
  path: str              # the checkpoint
  policy: CorePolicy     # of the method settings


@contextlib.contextmanager
def _argument(name: str, value: Any):
  """Raises a bad-input error from inside as a `ModelArgsError` naming the argument."""
  try:
    yield
  except (ValueError, TypeError, OSError) as e:
    raise ModelArgsError(name, value, e) from None


def _converted(model_args: Mapping[str, Any]) -> ModelArgs:
  fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
  for name, value in model_args.items():
    if name not in fields and name not in LM_EVAL_ARGS:
      raise ModelArgsError(name, value, f"unknown argument; known: {', '.join(fields)}")
  converted = {}
  for name, value in model_args.items():
    if name in fields:
      with _argument(name, value):
        converted[name] = fields[name].metadata["convert"](value)
  return ModelArgs(**converted)


def _checked_settings(args: ModelArgs, config: ModelConfig) -> Dict[str, Any]:
  """The core settings of `args`, each checked in `SPEC_CHECK_ORDER`."""
  settings = {name: getattr(ModelArgs(), name) for name in SPEC_CHECK_ORDER}
  for name in SPEC_CHECK_ORDER:
    settings[name] = getattr(args, name)
    with _argument(name, settings[name]):
      methods.spec_for(settings, config)
  return settings


def check_model_args(model_args: Mapping[str, Any]) -> CheckedModelArgs:
  """Every model_arg converted and checked, reading only the checkpoint's
  config (and, for similarity, the cluster artefacts); `ModelArgsError` names
  the first bad one."""
  args = _converted(model_args)
  with _argument("dtype", args.dtype):
    resolve_dtype(args.dtype)
  with _argument("method", args.method):
    methods.check_method(args.method)
  with _argument("model", args.model):
    path = checkpoint.model_path(args.model)
    config = checkpoint.load_config(path)
  settings = _checked_settings(args, config)
  artefacts = "predictor_dir" if args.method == "predictor" else "cluster_dir"
  with _argument(artefacts, getattr(args, artefacts)):
    policy = methods.policy_for(args.method, dict(settings, predictor_dir=args.predictor_dir),
                                config, cluster_dir=args.cluster_dir,
                                fingerprint=checkpoint.fingerprint(path))
  if args.rolling_context > args.rolling_window:
    raise ModelArgsError("rolling_context", args.rolling_context,
                         f"must be at most rolling_window ({args.rolling_window})")
  return CheckedModelArgs(args, path, policy)


def check_cli_model_args(model_args: Mapping[str, Any]) -> None:
  """`check_model_args` for lm-eval's command line, which passes some arguments itself."""
  for name in LM_EVAL_CLI_ARGS:
    if name in model_args:
      raise ModelArgsError(name, model_args[name], f"set by lm-eval's --{name}, not in model_args")
  check_model_args(model_args)


@register_model(MODEL_NAME)
class CoreInferLM(LM):
  def __init__(self, policy: Optional[CorePolicy] = None, **model_args):
    """`model_args` by the names of `ModelArgs`, checked before any weights
    load; `policy` (from Python) replaces the method settings' policy."""
    super().__init__()
    checked = check_model_args(model_args)
    args = checked.args
    loaded = checkpoint.load_model(checked.path, resolve_dtype(args.dtype))
    if loaded.tokenizer is None:
      raise ValueError(f"{loaded.path} has no tokenizer")
    self.tokenizer = loaded.tokenizer
    self.method = checked.policy if policy is None else policy
    self.scorer = ContinuationScorer(loaded.config, loaded.params, [self.method],
                                     cache_len=args.cache_len)
    self.generator = Generator(loaded.config, loaded.params, loaded.tokenizer,
                               cache_len=args.cache_len, policy=self.method)
    self.batch_size = args.batch_size
    self.cache_len = args.cache_len
    self.rolling_window, self.rolling_context = args.rolling_window, args.rolling_context
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


def main() -> None:
  """lm-eval's command line (`lm_eval.__main__.cli_evaluate`, whose steps
  these are) with this model's model_args checked before lm-eval indexes its
  tasks (seconds), and a bad one printed in one line. (With `--config`, the
  model_args may come from its YAML: the model checks them when it is made.)"""
  from lm_eval._cli import HarnessCLI
  from lm_eval.utils import setup_logging
  setup_logging()
  parser = HarnessCLI()
  args = parser.parse_args()
  try:
    if getattr(args, "model", None) == MODEL_NAME and not getattr(args, "config", None):
      check_cli_model_args(args.model_args or {})
    parser.execute(args)
  except ModelArgsError as e:
    print(e, file=sys.stderr)
    sys.exit(EXIT_USAGE)


if __name__ == "__main__":
  main()
