"""A policy defined here, outside the library, runs through `Generator`, the
continuation scorer and the lm-eval model without touching their code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import gather
from coreinfer_jax.core.policy import CorePolicy
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.model.forward import forward
from coreinfer_jax.runtime.batching import left_pad
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.prefill import prefill
from tests.conftest import random_prompts


class FirstK(CorePolicy):
  """Keeps neurons 0..k-1 of every sparsified layer, whatever the prompt."""

  def __init__(self, num_layers, num_neurons, beta):
    super().__init__("first_k", "first_k", "first_k",
                     core_spec(num_layers, num_neurons, beta=beta, sparse_layers="1:3"))

  def core_sets(self, rankings, arrays, batch):
    return tuple(None if k is None else jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, k))
                 for k in self.spec.layer_k), {}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def _first_k_params(m, policy):
  """The reference: every sparsified layer's FFN cut to its first k rows."""
  return m.params.with_ffns(tuple(
      None if k is None else gather.gather_shared(layer.ffn, jnp.arange(k))
      for layer, k in zip(m.params.layers, policy.spec.layer_k)))


def _reference_greedy(m, policy, prompt, steps):
  """Dense prefill, then greedy decoding on the cut FFNs, step by step."""
  tokens, start = left_pad([prompt], 32)
  logits, cache, _ = prefill(m.params, m.config, jnp.asarray(tokens), jnp.asarray(start), None, 64)
  out = [int(jnp.argmax(logits[0]))]
  cut = _first_k_params(m, policy)
  for _ in range(steps - 1):
    logits, cache = forward(cut, m.config, cache, jnp.asarray([[out[-1]]]))
    out.append(int(jnp.argmax(logits[0, -1])))
  return out


def test_generator_and_scorer_run_a_new_policy(tiny):
  policy = FirstK(tiny.config.num_layers, tiny.config.intermediate_size, 0.25)
  prompt = random_prompts([11], seed=3)[0]
  expected = _reference_greedy(tiny, policy, prompt, 8)
  gen = Generator(tiny.config, tiny.params, cache_len=64, buckets=(32,), policy=policy)
  (result,), stats = gen.generate_ids([prompt], 8)
  assert result.token_ids == expected
  batch, _ = gen.generate_ids([prompt, random_prompts([5], seed=5)[0]], 8)
  assert batch[0].token_ids == expected
  assert stats.ffn_bytes_fraction == pytest.approx((1 + 2 * 0.25) / 3)
  scorer = ContinuationScorer(tiny.config, tiny.params, [policy], cache_len=64, buckets=(32,))
  assert scorer.generate(prompt, 8)["first_k"].token_ids == expected

  # Teacher-forced scores equal the cut FFNs' log-probabilities over the context's cache.
  continuation = random_prompts([6], seed=4)[0]
  got = scorer.score(prompt, [continuation])["first_k"].token_logprobs[0]
  tokens, start = left_pad([prompt], 32)
  logits, cache, _ = prefill(tiny.params, tiny.config, jnp.asarray(tokens), jnp.asarray(start),
                             None, 64)
  rest, _ = forward(_first_k_params(tiny, policy), tiny.config, cache,
                    jnp.asarray([continuation[:-1]]))
  logprobs = jax.nn.log_softmax(jnp.concatenate([logits[:, None], rest], axis=1)[0], axis=-1)
  expected_lp = np.asarray(logprobs)[np.arange(len(continuation)), continuation]
  np.testing.assert_allclose(got, expected_lp, rtol=1e-4, atol=1e-4)


def test_lm_eval_model_runs_a_new_policy(tiny_llama_with_tokenizer):
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance

  from coreinfer_jax.eval.lm_eval_model import CoreInferLM
  m = loading.load_model(str(tiny_llama_with_tokenizer))
  policy = FirstK(m.config.num_layers, m.config.intermediate_size, 0.25)
  lm = CoreInferLM(model=str(tiny_llama_with_tokenizer), policy=policy, cache_len=64)
  dense = CoreInferLM(model=str(tiny_llama_with_tokenizer), cache_len=64)
  request = [Instance("loglikelihood", {}, ("a b c d", " e f"), 0)]
  (sparse_ll, _), = lm.loglikelihood(request)
  (dense_ll, _), = dense.loglikelihood(request)
  context = list(m.tokenizer("a b c d")["input_ids"])
  continuation = list(m.tokenizer("a b c d e f")["input_ids"])[len(context):]
  scorer = ContinuationScorer(m.config, m.params, [policy], cache_len=64)
  assert sparse_ll == pytest.approx(scorer.score(context, [continuation])["first_k"].logprob_sums[0])
  assert sparse_ll != pytest.approx(dense_ll)
  generate = [Instance("generate_until", {}, ("a b c", {"until": ["zzz"], "max_gen_toks": 5}), 0)]
  (text,) = lm.generate_until(generate)
  ids = list(m.tokenizer("a b c")["input_ids"])
  expected = Generator(m.config, m.params, m.tokenizer, cache_len=64,
                       policy=policy).generate_ids([ids], 5)[0][0].text
  assert text == expected
