"""Every weight dimension has a logical axis name, checked on every architecture."""

import jax
import jax.numpy as jnp
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import gather
from coreinfer_jax.model.ffn import MaskedFFN
from coreinfer_jax.model.params import logical_axes

SIZES = {"embed": "hidden_size", "neurons": "intermediate_size", "vocab": "vocab_size"}


def _named_leaves(params):
  axes = logical_axes(params)
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)   # noqa: E731
  return list(zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(axes, is_leaf=is_axes)))


def test_every_leaf_has_one_name_per_dimension(tiny_checkpoint):
  _, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  named = _named_leaves(m.params)
  assert len(named) == len(jax.tree_util.tree_leaves(m.params))
  for array, names in named:
    assert len(names) == array.ndim, (array.shape, names)
    for size, name in zip(array.shape, names):
      if name in SIZES:
        assert size == getattr(m.config, SIZES[name]), (array.shape, names)
  heads = m.config.num_heads * m.config.head_dim
  assert logical_axes(m.params).layers[0].attn.q_weight == ("heads", "embed")
  assert m.params.layers[0].attn.q_weight.shape == (heads, m.config.hidden_size)


def test_compact_and_masked_ffns_name_their_axes(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  ffn = m.params.layers[0].ffn
  core = jnp.asarray([[0, 5, 7], [1, 2, 3]], jnp.int32)
  for kind in (gather.gather_per_sequence(ffn, core), gather.gather_shared(ffn, core[0]),
               MaskedFFN(ffn, jnp.ones((2, m.config.intermediate_size)))):
    for array, names in _named_leaves(kind):
      assert len(names) == array.ndim
  assert logical_axes(gather.gather_per_sequence(ffn, core)).up_BKD == ("batch", "neurons", "embed")


def test_unknown_leaves_are_refused():
  with pytest.raises(TypeError, match="no logical axes for dict"):
    logical_axes({"w": jnp.zeros(3)})
