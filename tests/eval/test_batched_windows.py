"""Windows decoded B at a time: one at a time they equal the continuation
scorer; per-sequence sets do not depend on the batch; a shared set is the
per-sequence set for one window and dense at β = 1; sharing over a batch
changes the sparse result."""

import jax
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core.policy import Dense, Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.eval import runners, tasks
from coreinfer_jax.eval.batched_windows import batch_logprob_fn, batched_perplexity
from coreinfer_jax.eval.scorer import ContinuationScorer
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


@pytest.fixture(scope="module")
def windows():
  ids = random_prompts([8 * 20], seed=12)[0]
  return tasks.token_windows(ids, 12, 8, count=8)


def _stability(m, beta, sharing="per_sequence"):
  return Stability(core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta,
                             sparse_layers="all", sharing=sharing),
                   name=f"stability/{beta}/{sharing}")


def test_one_window_at_a_time_equals_the_continuation_scorer(tiny, windows):
  policies = [Dense(), _stability(tiny, 0.5)]
  scorer = ContinuationScorer(tiny.config, tiny.params, policies, cache_len=64)
  want = {r.method.name: r.metrics["perplexity"] for r in runners.evaluate_perplexity(
      scorer, windows, progress=False)}
  got = batched_perplexity(tiny.params, tiny.config, policies, windows, 1, 64, progress=False)
  assert got == pytest.approx(want, rel=1e-4)


def test_batching_changes_only_shared_sets(tiny, windows):
  policies = [Dense(), _stability(tiny, 0.5), _stability(tiny, 0.5, "shared"),
              _stability(tiny, 1.0, "shared")]
  alone = batched_perplexity(tiny.params, tiny.config, policies, windows, 1, 64, progress=False)
  batched = batched_perplexity(tiny.params, tiny.config, policies, windows, 4, 64, progress=False)
  for name in ("dense", "stability/0.5/per_sequence", "stability/1.0/shared"):
    assert batched[name] == pytest.approx(alone[name], rel=1e-4)
  assert alone["stability/0.5/shared"] == pytest.approx(alone["stability/0.5/per_sequence"], rel=1e-4)
  assert batched["stability/1.0/shared"] == pytest.approx(batched["dense"], rel=1e-4)
  # Sharing over the batch changes what each window's continuation scores.
  contexts = np.asarray([w.context for w in windows[:4]], np.int32)
  continuations = np.asarray([w.continuation for w in windows[:4]], np.int32)
  per_window = {sharing: np.asarray(jax.jit(batch_logprob_fn(tiny.config, 64, _stability(
      tiny, 0.5, sharing)))(tiny.params, contexts, continuations, (), None)) for sharing in
      ("per_sequence", "shared")}
  assert np.max(np.abs(per_window["shared"] - per_window["per_sequence"])) > 1e-2


def test_windows_that_do_not_split_into_batches_are_refused(tiny, windows):
  with pytest.raises(ValueError, match="8 windows do not split into batches of 3"):
    batched_perplexity(tiny.params, tiny.config, [Dense()], windows, 3, 64)
  with pytest.raises(ValueError, match="a window of 20 tokens does not fit the cache of 16"):
    batched_perplexity(tiny.params, tiny.config, [Dense()], windows, 2, 16)
