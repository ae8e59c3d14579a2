"""Our forward pass equals transformers' torch model on the same weights."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.runtime.batching import left_pad
from tests.conftest import random_prompts


def _torch_logits(hf_model, ids):
  with torch.no_grad():
    return hf_model(torch.tensor([ids])).logits[0].numpy()


def _forward(m, tokens_BT, start_B, cache_len=32):
  cache = init_cache(m.config, tokens_BT.shape[0], cache_len, jnp.asarray(start_B), jnp.float32)
  return jax.jit(model.forward, static_argnums=(1,))(m.params, m.config, cache, jnp.asarray(tokens_BT))


def _assert_rel_close(actual, expected, rtol=1e-4):
  err = np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
  assert err < rtol, f"relative error {err:.2e} >= {rtol}"


def test_logits_match_transformers(tiny_checkpoint):
  name, folder, hf_model = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  (ids,) = random_prompts([13])
  logits, _ = _forward(m, np.array([ids]), np.zeros(1, np.int32))
  _assert_rel_close(logits[0], _torch_logits(hf_model, ids))


def test_left_padded_batch_matches_each_prompt(tiny_checkpoint):
  name, folder, hf_model = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  prompts = random_prompts([4, 11, 7], seed=1)
  tokens, start = left_pad(prompts, 12)
  logits, _ = _forward(m, tokens, start)
  for b, ids in enumerate(prompts):
    _assert_rel_close(logits[b, start[b]:], _torch_logits(hf_model, ids))


def test_cached_decode_equals_full_forward(tiny_checkpoint):
  name, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  prompts = random_prompts([5, 9], seed=2)
  tokens, start = left_pad(prompts, 9)
  full, _ = _forward(m, tokens, start)
  step = jax.jit(model.forward, static_argnums=(1,))
  cache = init_cache(m.config, 2, 32, jnp.asarray(start), jnp.float32)
  logits, cache = step(m.params, m.config, cache, jnp.asarray(tokens[:, :4]))
  pieces = [logits]
  for t in range(4, 9):
    logits, cache = step(m.params, m.config, cache, jnp.asarray(tokens[:, t:t + 1]))
    pieces.append(logits)
  stepped = jnp.concatenate(pieces, axis=1)
  for b in range(2):   # padding rows are garbage by design; compare real slots
    chex.assert_trees_all_close(stepped[b, start[b]:], full[b, start[b]:], rtol=1e-5, atol=1e-5)
  assert int(cache.length) == 9
