"""Core sets chosen per neuron block (the mesh's local placement) and shared by
a batch: each against a NumPy reference of its definition, β = 1 against
dense, one set against the per-sequence path where they must agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import selection
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.core.taps import statistics_tap
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.runtime.prefill import prefill
from coreinfer_jax.runtime.generator import Generator
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)   # F = 96, 3 layers


def _spec(m, **kw):
  return core_spec(m.config.num_layers, m.config.intermediate_size, sparse_layers="all", **kw)


def _reference_blocks(primary_F, secondary_F, per_block, blocks):
  """Each block's `per_block` first by (primary, secondary) descending, then index."""
  size = len(primary_F) // blocks
  out = []
  for b in range(blocks):
    idx = np.arange(b * size, (b + 1) * size)
    out.append(idx[np.lexsort((idx, -secondary_F[idx], -primary_F[idx]))][:per_block])
  return np.concatenate(out)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_block_ranking_matches_numpy_reference(blocks):
  rng = np.random.default_rng(blocks)
  primary = rng.integers(0, 5, size=(3, 64)).astype(np.int32)   # many ties on the first key
  secondary = rng.normal(size=(3, 64)).astype(np.float32)
  got = np.asarray(selection.rank_in_blocks(8 // blocks * 2, blocks, jnp.asarray(primary),
                                            jnp.asarray(secondary)))
  assert got.shape == (3, blocks, 8 // blocks * 2)
  for b in range(3):
    np.testing.assert_array_equal(got[b].reshape(-1), _reference_blocks(
        primary[b], secondary[b], 8 // blocks * 2, blocks))


def test_blocked_spec_keeps_equal_counts_and_beta_one_is_dense(tiny):
  spec = _spec(tiny, beta=0.3, blocks=4)
  assert spec.layer_k == (28, 28, 28)   # 4 · round(0.3 · 96 / 4): a multiple of the blocks
  g = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec))
  state = g.prefill(tiny.params, random_prompts([7, 15], seed=2), 4)
  for core in state.core:
    owner = np.asarray(core) // 24
    assert all(np.bincount(row, minlength=4).tolist() == [7] * 4 for row in owner)
  dense = Generator(tiny.config, tiny.params, cache_len=64)
  full = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(_spec(tiny, beta=1.0, blocks=4)))
  for ids in random_prompts([6, 13], seed=3):
    assert full.generate_ids([ids], 8)[0][0].token_ids == dense.generate_ids([ids], 8)[0][0].token_ids


def test_a_block_count_that_does_not_divide_the_neurons_is_refused(tiny):
  with pytest.raises(ValueError, match="5 neuron blocks do not divide the model's 96 FFN neurons"):
    _spec(tiny, blocks=5)
  with pytest.raises(ValueError, match="unknown core sharing 'all'"):
    _spec(tiny, sharing="all")


def test_shared_set_is_one_per_layer_ranked_over_the_whole_batch(tiny):
  spec = _spec(tiny, beta=0.25, sharing="shared")
  g = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec))
  prompts = random_prompts([5, 12, 9], seed=4)
  state = g.prefill(tiny.params, prompts, 4)
  for layer, core in enumerate(state.core):
    assert core.shape == (1, 24)
    ffn = state.decode_params.layers[layer].ffn
    assert isinstance(ffn, FFNParams) and ffn.up_FD.shape == (24, 64)   # one compact FFN for B = 3
  # The set is the stability rule over the batch's tokens: the per-sequence
  # ranking keys summed over the batch.
  tokens, start = g.pad(prompts, 4)
  _, _, stats = jax.jit(lambda p, t, s: prefill(p, tiny.config, t, s, statistics_tap(
      "signed", 0.2, range(3)), 64))(tiny.params, tokens, start)
  for layer in range(3):
    primary, secondary = (np.asarray(x).sum(axis=0) for x in stats[layer])
    want = _reference_blocks(primary, secondary, 24, 1)
    np.testing.assert_array_equal(np.sort(np.asarray(state.core[layer][0])), np.sort(want))


def test_shared_with_one_prompt_equals_per_sequence_and_beta_one_is_dense(tiny):
  shared = Generator(tiny.config, tiny.params, cache_len=64,
                     policy=Stability(_spec(tiny, beta=0.4, sharing="shared")))
  own = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(_spec(tiny, beta=0.4)))
  for ids in random_prompts([6, 19], seed=5):
    assert shared.generate_ids([ids], 10)[0][0].token_ids == own.generate_ids([ids], 10)[0][0].token_ids
  dense = Generator(tiny.config, tiny.params, cache_len=64)
  full = Generator(tiny.config, tiny.params, cache_len=64,
                   policy=Stability(_spec(tiny, beta=1.0, sharing="shared")))
  prompts = random_prompts([4, 11, 8], seed=6)
  want, _ = dense.generate_ids(prompts, 8)
  got, _ = full.generate_ids(prompts, 8)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  assert full.compiled.compiles["decode"] == 1
