"""Lossless CoreInfer (`--verify=N`): greedy output equals dense greedy decoding
token for token; sampling draws from the dense distribution (a chi-square test
at a fixed seed) where the plain sparse sampler does not; the cache after a
verify is the dense cache of the same tokens; draft and verify compile once;
`--refresh` keeps all of that, and a refreshed set is the rule over the
prompt and the kept tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core.policy import Dense, Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.model.forward import forward
from coreinfer_jax.runtime import verify as verifying
from coreinfer_jax.runtime.generator import GenerationStats, Generator
from coreinfer_jax.runtime.sampling import SamplingConfig, probabilities
from tests.conftest import random_prompts, run_generate, run_script


def _stability(m, beta, **kw):
  return Stability(core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta,
                             sparse_layers="all", **kw))


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def test_greedy_verify_equals_dense_greedy_for_every_architecture(tiny_checkpoint):
  _, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  prompts = random_prompts([5, 17, 11], seed=21)   # a batch whose sequences accept differently
  want, _ = Generator(m.config, m.params, cache_len=64).generate_ids(prompts, 16)
  gen = Generator(m.config, m.params, cache_len=64, policy=_stability(m, 0.3), verify=4)
  got, stats = gen.generate_ids(prompts, 16)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  assert stats.verify_rounds > 0 and gen.compiled.compiles["decode"] == 0


@pytest.mark.parametrize("beta,num_draft", [(1.0, 8), (0.5, 1), (0.5, 2), (0.2, 8)])
def test_greedy_verify_equals_dense_greedy_at_every_beta_and_draft_length(tiny, beta, num_draft):
  prompts = random_prompts([5, 17, 11], seed=22)
  want, _ = Generator(tiny.config, tiny.params, cache_len=64).generate_ids(prompts, 20)
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=_stability(tiny, beta),
                  verify=num_draft)
  got, stats = gen.generate_ids(prompts, 20)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  record = stats.verify_record(num_draft, 3)
  if beta == 1.0:   # the draft is the dense model: every draft is accepted
    assert record["acceptance_rate"] == 1.0 and record["mean_accepted_per_verify"] == num_draft
  assert 0 <= record["acceptance_rate"] <= 1


def test_prompts_near_the_cache_end_and_one_compile_across_prompts(tiny):
  # buckets (8, 16): a 16-token prompt, 40 new tokens and 8 drafted slots fill the 64-slot cache
  gen = Generator(tiny.config, tiny.params, cache_len=64, buckets=(8, 16),
                  policy=_stability(tiny, 0.4), verify=8)
  dense = Generator(tiny.config, tiny.params, cache_len=64, buckets=(8, 16))
  for ids in random_prompts([16, 9, 14], seed=23):   # one bucket, three core sets
    got, _ = gen.generate_ids([ids], 40)
    want, _ = dense.generate_ids([ids], 40)
    assert got[0].token_ids == want[0].token_ids
  assert gen.compiled.compiles == {"prefill": 1, "gather": 1, "draft": 1, "verify": 1}


def test_the_cache_after_a_verify_is_the_dense_cache_of_the_same_tokens(tiny):
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=_stability(tiny, 0.3), verify=4)
  prompts = random_prompts([7, 12], seed=24)
  state = gen.prefill(gen.params, prompts, 8)
  start = int(state.cache.length)
  emitted, a, _, next_B, cache = gen.lossless.round(gen.params, state.decode_params, state.cache,
                                                    state.tokens_B)
  a = int(a)
  assert int(cache.length) == start + a + 1
  np.testing.assert_array_equal(np.asarray(next_B), np.asarray(emitted)[:, a])
  # The dense model fed the same tokens one step at a time.
  dense = gen.prefill(gen.params, prompts, 8).cache   # the prefill's slots are dense already
  fed = np.concatenate([np.asarray(state.tokens_B)[:, None], np.asarray(emitted)[:, :a]], axis=1)
  step = jax.jit(lambda c, t: forward(tiny.params, tiny.config, c, t)[1])
  for column in fed.T:
    dense = step(dense, jnp.asarray(column)[:, None])
  end = start + a + 1
  for got, want in zip(cache.k, dense.k):      # K [B, KVH, hd, S]
    np.testing.assert_allclose(np.asarray(got)[..., :end], np.asarray(want)[..., :end], atol=2e-5)
  for got, want in zip(cache.v, dense.v):      # V [B, KVH, S, hd]
    np.testing.assert_allclose(np.asarray(got)[:, :, :end], np.asarray(want)[:, :, :end], atol=2e-5)


def _chi_square_p(samples, probs):
  """p-value of `samples` drawn from `probs` (bins of expected count < 5 merged)."""
  counts = np.bincount(samples, minlength=len(probs)).astype(float)
  expected = probs * len(samples)
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  return scipy_stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def test_speculative_sampling_draws_from_the_dense_distribution(tiny):
  sampling = SamplingConfig(temperature=1.0)
  gen = Generator(tiny.config, tiny.params, cache_len=32, policy=_stability(tiny, 0.2))
  draws = 4000
  prompt = random_prompts([6], seed=25)[0]
  state = gen.prefill(gen.params, [prompt] * draws, 4)   # one prompt: one core set, copied
  tokens = jnp.full((draws,), 7, jnp.int32)              # the same last token everywhere
  key = jax.random.key(3)
  drafts, q, cache = jax.jit(verifying.draft_fn(tiny.config, sampling, 3))(
      state.decode_params, state.cache, tokens, key)
  emitted = jax.jit(verifying.verify_fn(tiny.config, sampling))(
      gen.params, cache, tokens, drafts, q, key)[0]
  dense_logits = forward(tiny.params, tiny.config, state.cache, tokens[:, None])[0][0, 0]
  p = np.asarray(probabilities(dense_logits[None], sampling))[0].astype(np.float64)
  q0 = np.asarray(q)[0, 0].astype(np.float64)
  assert np.abs(p - q0).sum() > 0.1   # the sparse model's next-token distribution differs
  assert _chi_square_p(np.asarray(emitted)[:, 0], p / p.sum()) > 1e-3     # verified: dense
  assert _chi_square_p(np.asarray(drafts)[:, 0], p / p.sum()) < 1e-6      # plain sparse: not


@pytest.mark.parametrize("kwargs, message", [
    ({"verify": 2}, "--verify needs a sparse method: it is the compact-FFN model that drafts"),
    ({"verify": -1}, "--verify must be at least 0 (0: off), got -1"),
])
def test_bad_verify_settings_are_refused(tiny, kwargs, message):
  policy = {} if kwargs["verify"] == 2 else {"policy": _stability(tiny, 0.5)}
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    Generator(tiny.config, tiny.params, cache_len=64, **policy, **kwargs)
  with pytest.raises(ValueError, match=r"--verify on a device mesh \(--tp > 1\) is not built yet"):
    verifying.check_verify(2, True, True, False)
  with pytest.raises(ValueError, match="does not combine with --offload_ffn"):
    verifying.check_verify(2, True, False, True)


def test_generate_verify_matches_dense_and_reports_acceptance(tiny_llama_with_tokenizer, tmp_path):
  out = tmp_path / "out.json"
  args = [f"--model={tiny_llama_with_tokenizer}", "--prompt=hello there", "--max_new_tokens=12",
          "--cache_len=64", "--nostream"]
  dense = run_generate(*args, f"--json_out={out}")
  assert dense.returncode == 0, dense.stderr
  want = json.loads(out.read_text())["token_ids"]
  verified = run_generate(*args, "--method=stability", "--beta=0.4", "--sparse_layers=all",
                          "--verify=3", "--refresh=2", f"--json_out={out}")
  assert verified.returncode == 0, verified.stderr
  payload = json.loads(out.read_text())
  assert payload["token_ids"] == want and payload["verify"] == 3
  assert 0 <= payload["acceptance_rate"] <= 1 and payload["verify_seconds"] > 0
  assert payload["refresh"] == 2 and payload["refreshes"] >= 1
  refused = run_generate(*args, "--verify=3")
  assert refused.returncode == 2
  assert refused.stderr.strip() == ("error: --verify needs a sparse method: it is the compact-FFN "
                                    "model that drafts")
  refused = run_generate(*args, "--method=stability", "--refresh=2")
  assert refused.returncode == 2 and "--refresh updates the core sets" in refused.stderr


def test_benchmark_measures_draft_lengths_on_real_prompts(tiny_llama_with_tokenizer, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("hello there\n\nthe cat sat on the mat\nhello\n")
  out = tmp_path / "bench.json"
  args = [f"--model={tiny_llama_with_tokenizer}", "--methods=dense,stability", "--betas=1.0",
          "--sparse_layers=all", "--prompt_len=8", "--cache_len=64", "--decode_steps=6",
          "--rounds=2"]
  proc = run_script("benchmark.py", *args, "--verifies=0,2", f"--prompts_file={prompts}",
                    f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  runs = json.loads(out.read_text())["runs"]
  assert [(r["method"], r["verify"]) for r in runs] == [("dense", 0), ("stability", 0),
                                                       ("stability", 2)]
  lossless = runs[2]   # β = 1: the draft is the dense model, every draft accepted
  assert lossless["acceptance_rate"] == 1.0 and lossless["mean_accepted_per_verify"] == 2.0
  # a round reads the weights 2 + 1 times for 3 tokens: the bound is dense's
  assert lossless["bound_speedup"] == pytest.approx(1.0)
  assert lossless["draft_seconds"] > 0 and lossless["verify_seconds"] > 0
  assert "verify: 100% of drafts accepted" in proc.stdout
  for bad, message in (("--verifies=two", "--verifies: expected a comma list of integers, got 'two'"),
                       ("--verifies=-1", "--verify must be at least 0 (0: off), got -1")):
    refused = run_script("benchmark.py", *args, bad)
    assert refused.returncode == 2 and refused.stderr.strip() == f"error: {message}"


# `--refresh=R`: the core sets re-ranked from the prompt's ranking keys plus
# the kept tokens' (the verify pass's dense values).

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
