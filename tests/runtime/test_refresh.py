"""`--refresh=R`: the core sets re-ranked from the prompt's ranking keys plus
the kept tokens' (the verify pass's dense values). The output stays dense
greedy; a refreshed set is the rule over the prompt and the kept tokens;
nothing recompiles."""

import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core.policy import Dense, Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import GenerationStats, Generator
from tests.conftest import random_prompts


def _stability(m, beta, **kw):
  return Stability(core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta,
                             sparse_layers="all", **kw))


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


@pytest.mark.parametrize("scoring", ["griffin", "signed"])
def test_refreshed_greedy_equals_dense_and_compiles_once(tiny, scoring):
  dense = Generator(tiny.config, tiny.params, cache_len=64)
  gen = Generator(tiny.config, tiny.params, cache_len=64, verify=4, refresh=2,
                  policy=_stability(tiny, 0.4, scoring=scoring))
  prompts = random_prompts([6, 13, 9], seed=31)
  for ids in prompts:
    got, stats = gen.generate_ids([ids], 24)
    assert got[0].token_ids == dense.generate_ids([ids], 24)[0][0].token_ids
    assert stats.refreshes >= 2
  got, _ = gen.generate_ids(prompts[:2], 24)   # a batch: per-sequence keys, one advance
  assert [r.token_ids for r in got] == [r.token_ids for r in dense.generate_ids(prompts[:2], 24)[0]]
  assert gen.compiled.compiles == {"prefill": 2, "gather": 2, "draft": 2, "verify": 2, "rerank": 2}


def test_a_refreshed_set_is_the_rule_over_the_prompt_and_the_kept_tokens(tiny):
  policy = _stability(tiny, 0.5, scoring="griffin")
  gen = Generator(tiny.config, tiny.params, cache_len=64, verify=4, refresh=1, policy=policy)
  (ids,) = random_prompts([11], seed=32)
  state = gen.prefill(gen.params, [ids], 16)
  t0 = int(state.tokens_B[0])
  emitted, a, _, _, _, keys = gen.lossless.round(gen.params, state.decode_params, state.cache,
                                                 state.tokens_B, state.aux["ranking_keys"])
  refreshed = gen.policy.sets_from_keys(keys, ())
  # The dense prefill of the prompt followed by the tokens the verify kept.
  history = ids + [t0] + np.asarray(emitted)[0, :int(a)].tolist()
  selected = Generator(tiny.config, tiny.params, cache_len=64, policy=policy).prefill(
      tiny.params, [history], 4).core
  changed = 0
  for layer, want in enumerate(selected):
    np.testing.assert_array_equal(np.sort(np.asarray(refreshed[layer])[0]), np.sort(want[0]))
    changed += not np.array_equal(np.sort(want[0]), np.sort(state.core[layer][0]))
  assert changed   # the kept tokens moved some layer's set
  # Through the decoding loop (a fresh prefill: the round took the cache), the
  # state carries the last refresh's sets.
  prompt_sets = state.core
  state, stats = gen.prefill(gen.params, [ids], 16), GenerationStats()
  list(gen.verified_tokens(state, 12, stats))
  assert stats.refreshes >= 1 and stats.refresh_seconds > 0
  assert any(not np.array_equal(np.sort(c[0]), np.sort(p[0]))
             for c, p in zip(state.core, prompt_sets) if c is not None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(refresh=-1, verify=2), "--refresh must be at least 0 (0: off), got -1"),
    (dict(refresh=4), "--refresh updates the core sets from the verify pass: it needs --verify"),
    (dict(refresh=4, verify=2, policy=Dense()), "--verify needs a sparse method"),
])
def test_bad_refresh_settings_are_refused(tiny, kwargs, message):
  kwargs.setdefault("policy", _stability(tiny, 0.5))
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    Generator(tiny.config, tiny.params, cache_len=64, **kwargs)
