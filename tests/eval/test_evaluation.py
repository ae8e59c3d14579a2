"""Evaluation under sparsity: continuations scored as decoding runs, β = 1
equals dense on every task kind, β < 1 differs (no dense-prefill trap)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.eval import frontier, runners
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.eval import tasks
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.core.policy import Dense, Stability
from coreinfer_jax.eval.scorer import ContinuationScorer
from tests.conftest import REPO, make_tiny_hf_model, random_prompts


@pytest.fixture(scope="module", params=["llama_tied", "opt_pre_ln"])
def tiny(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param + "_eval"))
  make_tiny_hf_model(request.param).save_pretrained(folder)
  return loading.load_model(folder, with_tokenizer=False)


def _stability(m, beta, scoring="signed", layers="all"):
  spec = core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta, scoring=scoring,
                   sparse_layers=layers)
  return Stability(spec, name=f"stability/{scoring}/{beta}")


def _step_by_step_logprobs(m, spec, context, continuation):
  """Log-probabilities of `continuation` as greedy-free sparse decoding would
  assign them: the first from the dense prefill's last logits, every later one
  from a one-token decode step on the Generator's gathered FFNs."""
  g = Generator(m.config, m.params, cache_len=64, policy=Stability(spec))
  state = g.prefill(m.params, [context], len(continuation))
  cache = init_cache(m.config, 1, 64, jnp.zeros((1,), jnp.int32), m.params.embed_VE.dtype)
  dense_logits, _ = model.forward(m.params, m.config, cache, jnp.asarray([context]), last_only=True)
  out = [jax.nn.log_softmax(dense_logits[0, 0])[continuation[0]]]
  cache = state.cache
  for previous, token in zip(continuation[:-1], continuation[1:]):
    logits, cache = model.forward(state.decode_params, m.config, cache, jnp.asarray([[previous]]))
    out.append(jax.nn.log_softmax(logits[0, 0])[token])
  return np.asarray(out)


@pytest.mark.parametrize("scoring", ["signed", "griffin"])
def test_sparse_continuation_equals_step_by_step_sparse_decode(tiny, scoring):
  context, continuation, other = random_prompts([13, 9, 5], seed=3)
  sparse = _stability(tiny, 0.4, scoring)
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense(), sparse], cache_len=64,
                              buckets=(16, 32), continuation_buckets=(8, 16))
  scores = scorer.score(context, [continuation, other])
  expected = _step_by_step_logprobs(tiny, sparse.spec, context, continuation)
  got = scores[sparse.name]
  np.testing.assert_allclose(got.token_logprobs[0], expected, rtol=1e-4, atol=1e-4)
  assert got.logprob_sums[0] == pytest.approx(expected.sum(), abs=1e-3)
  # The trap is avoided: the same tokens score differently under the dense model.
  assert abs(scores["dense"].logprob_sums[0] - got.logprob_sums[0]) > 1e-3
  # ... except the first, which decoding takes from the dense prefill.
  assert scores["dense"].token_logprobs[0][0] == got.token_logprobs[0][0]


def test_choices_are_scored_as_if_each_were_alone(tiny):
  context, a, b, c = random_prompts([11, 3, 12, 6], seed=5)
  sparse = _stability(tiny, 0.5)
  scorer = ContinuationScorer(tiny.config, tiny.params, [sparse], cache_len=64, buckets=(16,),
                              continuation_buckets=(4, 16))
  together = scorer.score(context, [a, b, c])[sparse.name].logprob_sums
  alone = [scorer.score(context, [x])[sparse.name].logprob_sums[0] for x in (a, b, c)]
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_beta_one_equals_dense_and_beta_below_one_differs_on_log_likelihood_tasks(tiny):
  methods = [Dense(), _stability(tiny, 1.0), _stability(tiny, 1.0, "griffin", "0:2"),
             _stability(tiny, 0.5)]
  scorer = ContinuationScorer(tiny.config, tiny.params, methods, cache_len=64, buckets=(16, 32),
                              continuation_buckets=(16, 32))
  tokens = sum(random_prompts([40, 40], seed=9), [])
  windows = tasks.token_windows(tokens, 12, 20, count=2)
  ppl = {r.method.name: r for r in runners.evaluate_perplexity(scorer, windows, progress=False)}
  context, *choices = random_prompts([10, 4, 7, 2], seed=2)
  mc = scorer.score(context, choices)
  for beta_one in methods[1:3]:
    assert ppl[beta_one.name].metrics == ppl["dense"].metrics      # exactly, KL exactly 0
    assert ppl[beta_one.name].ffn_bytes_fraction == 1.0
    for x, y in zip(mc[beta_one.name].token_logprobs, mc["dense"].token_logprobs):
      np.testing.assert_array_equal(x, y)
  sparse = ppl[methods[3].name]
  assert sparse.metrics["perplexity"] != ppl["dense"].metrics["perplexity"]
  assert sparse.metrics["kl"] > 0 and sparse.ffn_bytes_fraction == pytest.approx(0.5, abs=0.02)
  assert not np.array_equal(mc[methods[3].name].logprob_sums, mc["dense"].logprob_sums)


def test_batched_generation_equals_each_methods_generator(tiny):
  """Every method decoding as a masked row of one batch gives the tokens its
  own Generator (gathered FFNs) gives; β = 1 is dense, β < 1 differs."""
  methods = [Dense(), _stability(tiny, 1.0), _stability(tiny, 0.3),
             _stability(tiny, 0.5, "griffin", "paper")]
  scorer = ContinuationScorer(tiny.config, tiny.params, methods, cache_len=64, buckets=(16, 32))
  sparse_differs = []
  for prompt in random_prompts([9, 14, 5], seed=11):
    got = {name: r.token_ids for name, r in scorer.generate(prompt, 12).items()}
    for m in methods:
      expected = Generator(tiny.config, tiny.params, cache_len=64, buckets=(16, 32),
                           policy=m).generate_ids([prompt], 12)[0][0].token_ids
      assert got[m.name] == expected, m.name
    assert got[methods[1].name] == got["dense"]
    sparse_differs.append(got[methods[2].name] != got["dense"])
  assert any(sparse_differs)
  # One executable for every method and prompt (all fit bucket 16).
  assert scorer.compiled.compiles["generate12"] == 1


def test_batched_generation_stops_at_eos(tiny):
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense(), _stability(tiny, 0.3)],
                              cache_len=64, buckets=(16,))
  prompt = random_prompts([7], seed=5)[0]
  full = scorer.generate(prompt, 10)
  eos = full["dense"].token_ids[3]
  cut = scorer.generate(prompt, 10, eos_ids=[eos])
  first = full["dense"].token_ids.index(eos)
  assert cut["dense"].token_ids == full["dense"].token_ids[:first]
  assert cut["dense"].finish_reason == "eos"
  with pytest.raises(ValueError, match="at least one token"):
    scorer.generate([], 4)


def test_scorer_compiles_once_per_shape(tiny):
  sparse = [_stability(tiny, 0.5), _stability(tiny, 0.5, "magnitude"), _stability(tiny, 0.25)]
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense()] + sparse, cache_len=64,
                              buckets=(16,), continuation_buckets=(8,))
  for seed in range(4):
    context, a, b = random_prompts([5 + seed, 3 + seed, 6], seed=seed)
    scorer.score(context, [a, b])
  # One selecting prefill (every policy's core sets and keep masks inside it)
  # and one batched scoring pass for every method; nothing recompiles per
  # context or core set.
  assert scorer.compiled.compiles == {"select": 1, "score": 1}


def test_scorer_errors(tiny):
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense()], cache_len=32,
                              buckets=(16,), continuation_buckets=(8,))
  with pytest.raises(ValueError, match="at least one token"):
    scorer.score([3, 4], [[5], []])
  with pytest.raises(ValueError, match="does not fit"):
    scorer.score([3, 4], [list(range(3, 40))])
  with pytest.raises(ValueError, match="repeat"):
    ContinuationScorer(tiny.config, tiny.params, [Dense(), Dense()])


class _CharTokenizer:
  def __call__(self, text):
    return {"input_ids": [1 + ord(c) % 60 for c in text]}


def test_choices_that_cannot_fit_fail_before_any_example_is_scored(tiny):
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense()], cache_len=32,
                              buckets=(16,), continuation_buckets=(8,))
  examples = [tasks.ChoiceExample("a b c", (" d", " e"), 0),
              tasks.ChoiceExample("a b c", (" " + "x" * 12, " y"), 1)]   # 12 > the 8 bucket
  with pytest.raises(ValueError, match=r"hellaswag example 1 \(checked before scoring any\)"):
    runners.evaluate_choices(scorer, _CharTokenizer(), examples, "hellaswag", progress=False)
  assert not scorer.compiled.compiles                 # example 0 was not scored either
  result, = runners.evaluate_choices(scorer, _CharTokenizer(), examples[:1], "hellaswag",
                                        progress=False)
  assert result.n == 1 and set(result.metrics) == {"acc", "acc_norm"}


def _run_file(tmp_path, name, results):
  path = tmp_path / name
  path.write_text(json.dumps({"settings": {"limit": 2}, "results": results}))
  return str(path)


def _record(task, method, value, n=2):
  return {"task": task, "method": method, "kind": "dense" if method == "dense" else "stability",
          "family": method, "metrics": {"acc": value}, "n": n, "ffn_bytes_fraction": 1.0}


def test_merge_results_keeps_agreeing_repeats_and_refuses_disagreeing(tmp_path):
  a = _run_file(tmp_path, "a.json", [_record("piqa", "dense", 0.5), _record("piqa", "s", 0.4)])
  b = _run_file(tmp_path, "b.json", [_record("piqa", "dense", 0.5), _record("arc_easy", "s", 0.3)])
  script = [sys.executable, os.path.join(REPO, "scripts", "merge_results.py")]
  out = tmp_path / "m.json"
  run = subprocess.run(script + [f"--inputs={a},{b}", f"--json_out={out}", "--labels=gpu,cpu",
                                 "--metrics=piqa:acc"], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  merged = json.loads(out.read_text())
  assert [(r["task"], r["method"]) for r in merged["results"]] == [
      ("piqa", "dense"), ("piqa", "s"), ("arc_easy", "s")]
  assert [r["label"] for r in merged["runs"]] == ["gpu", "cpu"]
  assert "arc_easy" not in (tmp_path / "m.md").read_text()    # only the chosen column
  c = _run_file(tmp_path, "c.json", [_record("piqa", "dense", 0.6)])
  run = subprocess.run(script + [f"--inputs={a},{c}", f"--json_out={out}"],
                       capture_output=True, text=True)
  assert run.returncode == 2 and "disagrees" in run.stderr
  png = tmp_path / "m.png"
  run = subprocess.run(script + [f"--inputs={a}", f"--json_out={out}", "--within_loss=piqa:acc:0.25",
                                 f"--plot={png}", "--plot_min_ffn=0.5"], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [r["method"] for r in json.loads(out.read_text())["within_loss"]["rows"]] == ["s"]
  assert "× best uniform β" in (tmp_path / "m.md").read_text()
  run = subprocess.run(script + [f"--inputs={a}", f"--json_out={out}", "--within_loss=piqa:0.25"],
                       capture_output=True, text=True)
  assert run.returncode == 2 and "expected task:metric:max_loss" in run.stderr


def _frontier_point(method, family, kind, ffn, perplexity):
  return {"task": "wikitext", "method": method, "kind": kind, "family": family, "n": 8,
          "metrics": {"perplexity": perplexity}, "ffn_bytes_fraction": ffn}


def test_most_removed_within_picks_each_familys_deepest_point_inside_the_loss():
  records = [_frontier_point("dense", "dense", "dense", 1.0, 20.0),
             _frontier_point("u/0.95", "u", "stability", 0.95, 20.8),    # +4%
             _frontier_point("u/0.9", "u", "stability", 0.90, 21.2),     # +6%: outside
             _frontier_point("c", "c", "beta_file", 0.85, 20.9),         # +4.5%
             _frontier_point("bad", "bad", "beta_file", 0.5, 30.0)]      # no point inside
  rows = frontier.most_removed_within(records, "wikitext", "perplexity", 0.05)
  assert [(r["method"], round(r["removed"], 6)) for r in rows] == [("c", 0.15), ("u/0.95", 0.05)]
  assert rows[0]["loss"] == pytest.approx(0.045)
  table = frontier.within_loss_table(rows, "perplexity")
  assert "| c | c | 0.150 | 20.900 | +4.5% | 3.00 |" in table
  accuracy = [dict(r, metrics={"acc": 2.0 - r["metrics"]["perplexity"] / 20}) for r in records]
  assert [r["method"] for r in frontier.most_removed_within(accuracy, "wikitext", "acc", 0.05)] \
      == ["c", "u/0.95"]                   # a fall of accuracy is the loss ("bad" falls 50%)
  with pytest.raises(ValueError, match="needs a dense result"):
    frontier.most_removed_within(records[1:], "wikitext", "perplexity", 0.05)
