"""Generation: batching, compile-once, sampling and stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.batching import pick_bucket
from coreinfer_jax.runtime.sampling import SamplingConfig, _filter, argmax, sample
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def _generator(m, **kw):
  kw.setdefault("cache_len", 64)
  return Generator(m.config, m.params, None, **kw)


def test_batch_of_different_lengths_equals_each_alone(tiny_checkpoint):
  _, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  prompts = random_prompts([3, 17, 9], seed=3)
  g = _generator(m)
  batched, _ = g.generate_ids(prompts, 12)
  for ids, result in zip(prompts, batched):
    alone, _ = g.generate_ids([ids], 12)
    assert alone[0].token_ids == result.token_ids


def test_greedy_generation_matches_transformers(tiny_checkpoint):
  import torch
  _, folder, hf_model = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  (ids,) = random_prompts([6], seed=4)
  ours, _ = _generator(m).generate_ids([ids], 10)
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                            eos_token_id=list(m.config.eos_token_ids), pad_token_id=0)
  expected = [t for t in ref[0, len(ids):].tolist()]
  if 2 in expected:
    expected = expected[:expected.index(2)]
  assert ours[0].token_ids == expected


def test_decode_compiles_once_across_prompts_in_a_bucket(tiny):
  backend_compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: backend_compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  g = _generator(tiny)
  prompts = random_prompts([5, 20, 31], seed=5)   # all in the 32 bucket
  g.generate_ids([prompts[0]], 8)
  compiled_after_first = len(backend_compiles)
  for p in prompts[1:]:
    g.generate_ids([p], 8)
  assert g.compiled.compiles == {"prefill": 1, "decode": 1}
  assert len(backend_compiles) == compiled_after_first, "later prompts triggered compilation"


def test_eos_stops_and_max_tokens_bounds(tiny):
  g = _generator(tiny)
  (ids,) = random_prompts([4], seed=6)
  free, _ = g.generate_ids([ids], 6)
  assert len(free[0].token_ids) <= 6
  first = free[0].token_ids[0]
  g.eos_ids = (first,)
  stopped, _ = g.generate_ids([ids], 6)
  assert stopped[0].token_ids == [] and stopped[0].finish_reason == "eos"


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
  (ids,) = random_prompts([5], seed=7)
  greedy, _ = _generator(tiny).generate_ids([ids], 10)
  top1, _ = _generator(tiny, sampling=SamplingConfig(temperature=0.8, top_k=1), seed=3).generate_ids([ids], 10)
  assert top1[0].token_ids == greedy[0].token_ids
  hot = SamplingConfig(temperature=5.0)
  a, _ = _generator(tiny, sampling=hot, seed=1).generate_ids([ids], 10)
  b, _ = _generator(tiny, sampling=hot, seed=1).generate_ids([ids], 10)
  c, _ = _generator(tiny, sampling=hot, seed=2).generate_ids([ids], 10)
  assert a[0].token_ids == b[0].token_ids
  assert a[0].token_ids != c[0].token_ids


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = _filter(logits, SamplingConfig(temperature=1.0, top_p=0.7)) > -1e30
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = _filter(logits, SamplingConfig(temperature=1.0, top_p=0.5)) > -1e30
  np.testing.assert_array_equal(kept, [True, False, False, False])
  draws = jax.vmap(lambda k: sample(logits[None], k, SamplingConfig(temperature=1.0, top_p=0.7)))(
      jax.random.split(jax.random.key(0), 200))
  assert set(np.unique(draws).tolist()) == {0, 1}


def test_bucket_choice_and_bad_lengths():
  assert pick_bucket(5, 10, 64, (8, 16, 32)) == 8
  assert pick_bucket(9, 10, 64, (8, 16, 32)) == 16
  assert pick_bucket(40, 10, 64, (8, 16, 32, 64)) == 54   # largest bucket that leaves room
  with pytest.raises(ValueError, match="does not fit the cache length 64"):
    pick_bucket(60, 10, 64, (8, 64))
  with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
    pick_bucket(5, 0, 64, (8,))
  with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
    pick_bucket(5, -3, 64, (8,))


def test_prompt_longer_than_cache_is_an_error(tiny):
  with pytest.raises(ValueError, match="does not fit the cache length"):
    _generator(tiny, cache_len=16).generate_ids(random_prompts([20]), 4)


def test_greedy_argmax_equals_jnp_argmax_with_ties_to_the_first_index():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 1000)).astype(np.float32)
  logits[1, [3, 700]] = 9.0           # a tie: the first index wins
  logits[2] = 0.0                     # all equal
  logits[3, -1] = 50.0                # the last index
  np.testing.assert_array_equal(jax.jit(argmax)(jnp.asarray(logits)), np.argmax(logits, axis=-1))
  assert jax.jit(argmax)(jnp.asarray(logits)).dtype == jnp.int32
