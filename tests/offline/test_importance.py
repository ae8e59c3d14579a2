"""Model-global importance (GLASS-style): built offline, mixed into each
prompt's ranking keys; and the weight-aware scorings in the decode path."""

import json

import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import importance
from coreinfer_jax.core.policy import GlobalMix, Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.offline import clustering
from coreinfer_jax.runtime.generator import Generator
from tests.conftest import random_prompts, run_generate, run_script


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def _spec(m, **kw):
  return core_spec(m.config.num_layers, m.config.intermediate_size, sparse_layers="all", **kw)


def _importance(m, spec, texts):
  plan = clustering.StatisticsPlan(spec.scoring, spec.alpha, spec.sparse_layers)
  stats = clustering.collect_statistics(m.params, m.config, texts, plan, batch_size=2)
  manifest = {"model": {"path": "tiny", "fingerprint": None,
                        "config": {"num_layers": m.config.num_layers,
                                   "intermediate_size": m.config.intermediate_size}},
              "core": {"scoring": spec.scoring, "alpha": spec.alpha}, "dataset": {"source": "t"}}
  return importance.GlobalImportance(importance.from_statistics(stats.primary, m.config.num_layers),
                                     manifest), stats


@pytest.mark.parametrize("scoring", ["signed", "wina_griffin"])
def test_mix_weight_zero_is_the_prompts_set_and_one_the_global_set(tiny, scoring):
  spec = _spec(tiny, beta=0.3, scoring=scoring)
  prior, stats = _importance(tiny, spec, random_prompts([6, 9, 13, 4], seed=21))
  for layer in spec.sparse_layers:   # each text's share of its key, averaged
    v = prior.layer_importance[layer]
    assert v.shape == (tiny.config.intermediate_size,) and v.sum() == pytest.approx(1.0, rel=1e-5)
    shares = stats.primary[layer] / stats.primary[layer].sum(1, keepdims=True)
    np.testing.assert_allclose(v, shares.mean(0), rtol=1e-5)
  prompts = random_prompts([5, 11], seed=22)
  own = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec)).prefill(
      tiny.params, prompts, 4).core
  mixed = {w: Generator(tiny.config, tiny.params, cache_len=64,
                        policy=GlobalMix(spec, prior, w)).prefill(tiny.params, prompts, 4).core
           for w in (0.0, 0.5, 1.0)}
  for layer in spec.sparse_layers:
    k = spec.layer_k[layer]
    np.testing.assert_array_equal(mixed[0.0][layer], own[layer])
    static = np.argsort(-prior.layer_importance[layer], kind="stable")[:k]
    for b in range(2):   # w = 1: the prior's top k for every prompt, whatever it says
      assert set(mixed[1.0][layer][b].tolist()) == set(static.tolist())
  assert any(not np.array_equal(mixed[0.5][i], own[i]) for i in spec.sparse_layers)


def test_new_scorings_and_global_mix_at_beta_one_equal_dense_and_compile_once(tiny):
  spec = _spec(tiny, beta=1.0, scoring="wina")
  prior, _ = _importance(tiny, spec, random_prompts([7, 5], seed=23))
  prompts = random_prompts([4, 15, 9], seed=24)
  dense = Generator(tiny.config, tiny.params, cache_len=64)
  policies = [Stability(spec), Stability(_spec(tiny, beta=1.0, scoring="wina_griffin")),
              GlobalMix(spec, prior, 0.5)]
  for policy in policies:
    g = Generator(tiny.config, tiny.params, cache_len=64, policy=policy)
    for ids in prompts:
      expected = dense.generate_ids([ids], 8)[0][0].token_ids
      assert g.generate_ids([ids], 8)[0][0].token_ids == expected
    assert g.compiled.compiles == {"prefill": 1, "gather": 1, "decode": 1}


def test_importance_script_then_generation_and_its_refusals(tiny_llama_with_tokenizer,
                                                             synthetic_texts, tmp_path):
  model = f"--model={tiny_llama_with_tokenizer}"
  out = str(tmp_path / "importance.npz")
  built = run_script("importance.py", model, f"--dataset={synthetic_texts}", f"--out={out}",
                     "--scoring=griffin", "--sparse_layers=1:3", "--batch_size=8", "--noprogress")
  assert built.returncode == 0, built.stderr
  loaded = importance.load(out)
  assert loaded.layers == (1, 2) and loaded.manifest["dataset"]["num_texts"] == 30
  assert not list(tmp_path.glob("*.partial-*"))   # the resumable batches are cleared
  json_out = tmp_path / "gen.json"
  base = [model, "--prompt=a b c d", "--max_new_tokens=3", "--method=stability", "--beta=0.5",
          "--scoring=griffin", f"--importance={out}", "--cache_len=64", "--nostream"]
  ran = run_generate(*base, "--sparse_layers=2", "--importance_weight=0.25",
                     f"--json_out={json_out}")
  assert ran.returncode == 0, ran.stderr
  core = json.loads(json_out.read_text())["core"]
  assert core["importance_weight"] == 0.25 and core["layers"] == [2]
  for args, message in (
      (["--scoring=signed"], "scoring: built with griffin, asked for signed"),
      (["--sparse_layers=all"], "sparsified layers: built with [1, 2], asked for [0, 1, 2]"),
      (["--importance_weight=1.5"], "importance weight must be in [0, 1], got 1.5"),
      (["--method=dense"], "--importance is only used by --method=stability, not dense"),
      ([f"--importance={synthetic_texts}"], "not an importance file")):
    result = run_generate(*base, "--sparse_layers=1:3", *args)
    assert result.returncode == 2 and message in result.stderr and "[loaded" not in result.stderr, \
        result.stderr
