"""Attention over the filled part of the cache equals attention over all of it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.model import layers


def test_spans_cover_the_cache_and_skip_spans_shorter_than_the_chunk():
  assert layers.attention_spans(512, 1) == (128, 256, 512)
  assert layers.attention_spans(1000, 1) == (128, 256, 512, 1000)
  assert layers.attention_spans(512, 200) == (256, 512)
  assert layers.attention_spans(100, 1) == (100,)


@pytest.mark.parametrize("num_tokens", [1, 3])
@pytest.mark.parametrize("filled", [1, 127, 128, 129, 256, 257, 511, 512])
def test_attend_filled_equals_attend_over_the_whole_cache(filled, num_tokens):
  if filled < num_tokens:
    pytest.skip("a chunk fills at least its own slots")
  B, KVH, G, S, hd = 2, 2, 3, 512, 8
  keys = jax.random.split(jax.random.key(filled), 3)
  q = jax.random.normal(keys[0], (B, KVH, G, num_tokens, hd))
  k_cache = jax.random.normal(keys[1], (B, KVH, hd, S))
  v_cache = jax.random.normal(keys[2], (B, KVH, S, hd))
  q_slot_T = filled - num_tokens + jnp.arange(num_tokens)
  start_B = jnp.array([0, min(5, filled - 1)])
  slots = jnp.arange(S)
  visible_BTS = (slots[None, None] <= q_slot_T[None, :, None]) & (slots[None, None] >= start_B[:, None, None])
  full = layers.attend(q, k_cache, v_cache, visible_BTS, 0.3)
  # Whatever lies past the filled slots must not matter.
  garbage = jnp.where(slots < filled, k_cache, 1e4)
  filled_only = jax.jit(layers.attend_filled, static_argnums=4)(
      q, garbage, v_cache, visible_BTS, 0.3, jnp.int32(filled))
  chex.assert_trees_all_close(filled_only, full, atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(filled_only)).all()
