"""Sparse decoding: equivalence to the dense path, compile-once, batches, errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.core import gather
from coreinfer_jax.model import ffn as layers
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.core.spec import core_spec, parse_layers
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.batching import left_pad
from coreinfer_jax.core.policy import Stability
from tests.conftest import make_tiny_hf_model, random_prompts, run_generate
from tests.core.test_selection import reference_signed


def _load(folder):
  return loading.load_model(folder, with_tokenizer=False)


def _spec(m, **kw):
  kw.setdefault("sparse_layers", "all")
  return core_spec(m.config.num_layers, m.config.intermediate_size, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return _load(tiny_llama)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("opt_pre_ln_sparse"))
  make_tiny_hf_model("opt_pre_ln").save_pretrained(folder)
  return _load(folder)


def test_beta_one_equals_dense(tiny_checkpoint):
  _, folder, _ = tiny_checkpoint
  m = _load(folder)
  prompts = random_prompts([4, 19, 11], seed=7)
  dense = Generator(m.config, m.params, cache_len=64)
  sparse = Generator(m.config, m.params, cache_len=64, policy=Stability(_spec(m, beta=1.0)))
  for ids in prompts:
    expected, _ = dense.generate_ids([ids], 10)
    got, stats = sparse.generate_ids([ids], 10)
    assert got[0].token_ids == expected[0].token_ids
    assert stats.ffn_bytes_fraction == 1.0
  # The decode step's logits: gathered FFNs hold every neuron, in core order.
  dense_state = dense.prefill(m.params, prompts[1:], 8)
  sparse_state = sparse.prefill(m.params, prompts[1:], 8)
  assert any(not np.array_equal(c, np.arange(c.shape[1])[None].repeat(2, 0))
             for c in sparse_state.core)   # rows really were permuted
  step = dense_state.tokens_B[:, None]
  dense_logits, _ = model.forward(dense_state.decode_params, m.config, dense_state.cache, step)
  sparse_logits, _ = model.forward(sparse_state.decode_params, m.config, sparse_state.cache, step)
  chex.assert_trees_all_close(sparse_logits, dense_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compact_ffn_equals_dense_ffn_with_other_neurons_zeroed(family, tiny, tiny_opt):
  m = tiny if family == "llama" else tiny_opt
  ffn = m.params.layers[1].ffn
  F = m.config.intermediate_size
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 5, m.config.hidden_size)), jnp.float32)
  for k in (1, 17, F):
    core = jnp.asarray(np.stack([rng.choice(F, k, replace=False) for _ in range(2)]), jnp.int32)
    compact = jax.jit(gather.gather_per_sequence)(ffn, core)
    chex.assert_shape(compact.up_BKD, (2, k, m.config.hidden_size))
    got = layers.ffn_output(compact, layers.neuron_values(m.config, compact, x).h)
    keep = np.zeros((2, F), np.float32)
    for b in range(2):
      keep[b, np.asarray(core[b])] = 1.0
    h = layers.neuron_values(m.config, ffn, x).h
    chex.assert_trees_all_close(got, layers.ffn_output(ffn, h * keep[:, None]), rtol=1e-5, atol=1e-6)
    masked = layers.MaskedFFN(ffn, jnp.asarray(keep))   # the dense-shaped equivalent
    chex.assert_trees_all_close(got, layers.ffn_output(masked, h), rtol=1e-5, atol=1e-6)
    # One set shared by the batch: each sequence's rows are that set's rows.
    shared = jax.jit(gather.gather_shared)(ffn, core[0])
    chex.assert_shape(shared.up_FD, (k, m.config.hidden_size))
    chex.assert_trees_all_close(layers.ffn_output(shared, layers.neuron_values(m.config, shared, x).h)[0],
                                got[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,top_m", [("llama", "bisection"), ("opt", "bisection"),
                                          ("llama", "top_k")])
def test_prefill_core_is_the_reference_rule_on_this_prompts_activations(family, top_m, tiny, tiny_opt):
  m = tiny if family == "llama" else tiny_opt
  spec = _spec(m, beta=0.3, alpha=0.25, sparse_layers="1:3", top_m=top_m)
  prompts = random_prompts([5, 14], seed=9)
  state = Generator(m.config, m.params, cache_len=64, policy=Stability(spec)).prefill(m.params, prompts, 4)
  assert state.core[0] is None and state.core[1].shape == (2, spec.layer_k[1])
  # Each layer's FFN values from the same forward, captured instead of selected.
  tokens, start = left_pad(prompts, 32)
  cache = init_cache(m.config, 2, 64, jnp.asarray(start), jnp.float32)
  _, _, values = model.forward_tapped(m.params, m.config, cache, jnp.asarray(tokens),
                                      lambda i, v, real: v.values)
  for layer in (1, 2):
    for b, n in enumerate(map(len, prompts)):
      expected = reference_signed(np.asarray(values[layer][b, -n:]), spec.layer_k[layer], 0.25)
      np.testing.assert_array_equal(np.asarray(state.core[layer][b]), expected)


def test_sparse_decode_compiles_once_across_prompts_and_core_sets(tiny):
  backend_compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: backend_compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  g = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(_spec(tiny, beta=0.4)))
  prompts = random_prompts([5, 20, 31], seed=10)   # one bucket, three lengths
  cores = []
  g.generate_ids([prompts[0]], 6)
  compiled_after_first = len(backend_compiles)
  for ids in prompts:
    g.generate_ids([ids], 6)
    cores.append(g.prefill(tiny.params, [ids], 6).core)
  assert g.compiled.compiles == {"prefill": 1, "gather": 1, "decode": 1}
  assert len(backend_compiles) == compiled_after_first
  assert any(not np.array_equal(a, b) for a, b in zip(cores[0], cores[1]) if a is not None)


@pytest.mark.parametrize("scoring", ["signed", "magnitude", "griffin"])
def test_sparse_batch_equals_each_prompt_alone(tiny_opt, tiny, scoring):
  for m in (tiny, tiny_opt):
    g = Generator(m.config, m.params, cache_len=64, policy=Stability(_spec(m, beta=0.5, scoring=scoring)))
    prompts = random_prompts([3, 17, 9], seed=11)
    batched, _ = g.generate_ids(prompts, 10)
    for ids, result in zip(prompts, batched):
      alone, _ = g.generate_ids([ids], 10)
      assert alone[0].token_ids == result.token_ids


def test_sparsity_changes_the_output(tiny):
  (ids,) = random_prompts([12], seed=12)
  dense, _ = Generator(tiny.config, tiny.params, cache_len=64).generate_ids([ids], 16)
  sparse, stats = Generator(tiny.config, tiny.params, cache_len=64,
                            policy=Stability(_spec(tiny, beta=0.1))).generate_ids([ids], 16)
  assert sparse[0].token_ids != dense[0].token_ids
  assert stats.ffn_bytes_fraction == pytest.approx(10 / 96)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), r"beta \(kept fraction\) must be in \(0, 1\], got 0.0"),
    (dict(beta=1.5), r"must be in \(0, 1\], got 1.5"),
    (dict(alpha=0.0), r"alpha \(token-wise fraction\) must be in \(0, 1\], got 0.0"),
    (dict(alpha=2.0), r"alpha .* got 2.0"),
    (dict(scoring="topk"),
     "unknown scoring 'topk'; choose one of signed, magnitude, griffin, wina, wina_griffin"),
    (dict(sparse_layers="1,7"), "layer index 7 is out of range for a model of 3 layers"),
    (dict(sparse_layers="0:9"), "layer index 3 is out of range"),
    (dict(sparse_layers="x"), "expected 'paper', 'all', 'A:B' or a comma list"),
    (dict(sparse_layers="1,2", beta=(0.5, 0.4, 0.3)), r"3 per-layer β values for 2 sparsified layers"),
])
def test_bad_core_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    core_spec(3, 96, **kwargs)


def test_beta_file(tmp_path):
  path = tmp_path / "betas.json"
  path.write_text(json.dumps({"beta": [None, 0.5, 0.25]}))
  spec = core_spec(3, 96, beta_file=str(path))
  assert spec.layer_k == (None, 48, 24) and spec.sparse_layers == (1, 2)
  path.write_text(json.dumps({"beta": [0.5, 0.5]}))
  with pytest.raises(ValueError, match="2 per-layer β values for a model of 3 layers"):
    core_spec(3, 96, beta_file=str(path))


def test_paper_layer_range_scales_with_depth():
  assert parse_layers("paper", 32) == tuple(range(5, 27))   # the official 5..26
  assert parse_layers("paper", 30) == tuple(range(5, 25))   # SmolLM2
  assert parse_layers("paper", 22) == tuple(range(3, 19))   # TinyLlama
  assert parse_layers("all", 3) == (0, 1, 2)


def test_generate_script_reports_the_core(tiny_llama_with_tokenizer, tmp_path):
  out = tmp_path / "out.json"
  proc = run_generate(f"--model={tiny_llama_with_tokenizer}", "--prompt=a b c d e f",
                      "--max_new_tokens=5", "--method=stability", "--beta=0.25",
                      "--scoring=magnitude", "--sparse_layers=all", "--cache_len=64", f"--json_out={out}", "--nostream")
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  assert payload["core"] == {"k": 24, "layers": [0, 1, 2], "scoring": "magnitude", "alpha": 0.2,
                             "blocks": 1, "sharing": "per_sequence", "top_m": "bisection",
                             "beta": 0.25}
  assert payload["ffn_bytes_fraction"] == pytest.approx(0.25)
  # Selection's cost over three rounds, or (a tiny model's selection is below
  # its prefill's noise) why not.
  assert (isinstance(payload["select_gather_seconds"], float)
          or "noise" in payload["select_gather_seconds_reason"])
  assert payload["decode_compiles"] == 1


@pytest.mark.parametrize("args, message", [
    (["--method=stability", "--beta=1.5"], "must be in (0, 1], got 1.5"),
    (["--method=stability", "--alpha=0"], "must be in (0, 1], got 0.0"),
    (["--method=stability", "--sparse_layers=0,3"], "layer index 3 is out of range"),
    (["--method=stability", "--beta=0.5,0.4"], "2 per-layer β values for 3 sparsified layers"),
    (["--method=stability", "--scoring=best"], "unknown scoring 'best'"),
    (["--method=sparse"], "unknown method 'sparse'"),
])
def test_generate_script_refuses_bad_core_settings_before_loading(tiny_llama_with_tokenizer, args,
                                                                   message):
  proc = run_generate(f"--model={tiny_llama_with_tokenizer}", "--prompt=a b", "--sparse_layers=all",
                      *args)
  assert proc.returncode == 2
  assert message in proc.stderr
  assert "[loaded" not in proc.stderr
