"""Tensor-parallel checks that need several devices: run by test_mesh.py in a
process started with `--xla_force_host_platform_device_count=4` (XLA reads
it before JAX starts, so it cannot be set inside this test session)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import cost
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.model.forward import forward
from coreinfer_jax.runtime import mesh as meshes
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime.generator import Generator
from tests.conftest import random_prompts


def _spec(array):
  """The array's partition spec, one entry per dimension (JAX drops trailing Nones)."""
  spec = tuple(array.sharding.spec)
  return spec + (None,) * (array.ndim - len(spec))


@pytest.fixture(scope="module", autouse=True)
def four_devices():
  assert jax.device_count() == 4, "run with --xla_force_host_platform_device_count=4"


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_logits_equal_one_device(tiny_checkpoint, tp):
  _, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  mesh = meshes.make_mesh(tp)
  sharded = meshes.place_params(m.params, m.config, mesh)
  tokens = jnp.asarray(random_prompts([12], seed=3))
  cache = init_cache(m.config, 1, 32, jnp.zeros((1,), jnp.int32), jnp.float32)
  want, _ = jax.jit(forward, static_argnums=1)(m.params, m.config, cache, tokens)
  got, _ = jax.jit(forward, static_argnums=1)(sharded, m.config, cache, tokens)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_sharded_generation_equals_one_device_and_compiles_once(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  prompts = [random_prompts([9], seed=s)[0] for s in (1, 2)]
  single = Generator(m.config, m.params, cache_len=64)
  sharded = Generator(m.config, m.params, cache_len=64, mesh=meshes.make_mesh(4))
  for ids in prompts:
    want, _ = single.generate_ids([ids], 12)
    got, _ = sharded.generate_ids([ids], 12)
    assert got[0].token_ids == want[0].token_ids
  assert sharded.compiled.compiles["decode"] == 1 and sharded.compiled.compiles["prefill"] == 1


def test_every_decode_argument_is_placed_as_intended(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)   # 4 heads, 2 KV heads, F 96, vocab 128
  gen = Generator(m.config, m.params, cache_len=64, mesh=meshes.make_mesh(4))
  state = gen.prefill(gen.params, random_prompts([9], seed=1), 4)
  layer = state.decode_params.layers[0]
  specs = {"q": layer.attn.q_weight, "k": layer.attn.k_weight, "o": layer.attn.o_weight,
           "up": layer.ffn.up_FD, "down": layer.ffn.down_DF, "norm": layer.ffn_norm.scale_D,
           "embed": state.decode_params.embed_VE, "cache_k": state.cache.k[0],
           "cache_v": state.cache.v[0]}
  specs = {name: _spec(array) for name, array in specs.items()}
  assert specs["q"] == ("tp", None)                 # heads
  assert specs["k"] == (None, None)                 # 2 KV heads on 4 devices: replicated
  assert specs["o"] == (None, "tp")                 # row-parallel: heads are its input
  assert specs["up"] == ("tp", None)                # neurons as rows
  assert specs["down"] == (None, "tp")              # neurons as columns
  assert specs["norm"] == (None,)
  assert specs["embed"] == ("tp", None)             # vocabulary
  assert specs["cache_k"] == specs["cache_v"] == (None, None, None, None)
  tokens, cache = state.tokens_B, state.cache
  for _ in range(3):   # the step keeps the placement it was given (the cache is donated)
    tokens, cache = gen.decode(state.decode_params, cache, tokens)
  assert _spec(cache.k[0]) == (None, None, None, None)
  shard_shapes = {s.data.shape for s in state.decode_params.layers[0].ffn.up_FD.addressable_shards}
  assert shard_shapes == {(24, 64)}   # each device holds a quarter of the neurons
  assert np.asarray(tokens).shape == (1,)


def test_kv_heads_split_when_the_mesh_divides_them(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  gen = Generator(m.config, m.params, cache_len=64, mesh=meshes.make_mesh(2))
  state = gen.prefill(gen.params, random_prompts([9], seed=1), 4)
  assert _spec(gen.params.layers[0].attn.k_weight) == ("tp", None)
  assert _spec(state.cache.k[0]) == _spec(state.cache.v[0]) == (None, "tp", None, None)
  tokens, cache = gen.decode(state.decode_params, state.cache, state.tokens_B)
  assert _spec(cache.k[0]) == (None, "tp", None, None)



def _stability(m, **kw):
  return Stability(core_spec(m.config.num_layers, m.config.intermediate_size, sparse_layers="all",
                             **kw))


def test_local_placement_holds_each_devices_own_rows_and_equals_one_device(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)   # F 96: 24 neurons a device
  policy = _stability(m, beta=0.5, blocks=4)                  # k 48: 12 a device
  gen = Generator(m.config, m.params, cache_len=64, policy=policy, mesh=meshes.make_mesh(4))
  state = gen.prefill(gen.params, random_prompts([9, 14], seed=1), 4)
  for dense, compact, core in zip(m.params.layers, state.decode_params.layers, state.core):
    up = compact.ffn.up_BKD
    assert _spec(up) == (None, "tp", None) and _spec(compact.ffn.down_BDK) == (None, None, "tp")
    for shard in up.addressable_shards:
      d = shard.index[1].start // 12   # the device's slots
      assert shard.data.shape == (2, 12, 64)
      own = np.sort(np.asarray(core)[:, d * 12:(d + 1) * 12], axis=-1)
      assert np.all((own >= d * 24) & (own < (d + 1) * 24))   # its own block only
      owner = {s.index[0].start // 24: s.device for s in gen.params.layers[0].ffn.up_FD.addressable_shards}
      assert shard.device == owner[d]   # on the device that holds block d of the dense rows
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(dense.ffn.up_FD)[own])
  single = Generator(m.config, m.params, cache_len=64, policy=policy)
  for ids in random_prompts([7, 18], seed=2):
    assert gen.generate_ids([ids], 10)[0][0].token_ids == single.generate_ids([ids], 10)[0][0].token_ids


def test_global_placement_equals_one_device_sparse_and_beta_one_dense(tiny_checkpoint):
  # Every architecture on 4 devices; 2 devices: test_mesh.py and test_distributed.py.
  _, folder, _ = tiny_checkpoint
  m = loading.load_model(folder, with_tokenizer=False)
  mesh = meshes.make_mesh(4)
  prompts = random_prompts([5, 13, 9], seed=3)
  for beta in (0.3, 1.0):
    policy = _stability(m, beta=beta)
    gen = Generator(m.config, m.params, cache_len=64, policy=policy, mesh=mesh)
    reference = (Generator(m.config, m.params, cache_len=64, policy=policy) if beta < 1
                 else Generator(m.config, m.params, cache_len=64))
    got, _ = gen.generate_ids(prompts, 10)
    want, _ = reference.generate_ids(prompts, 10)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_sparse_decode_on_the_mesh_compiles_once_with_intended_placements(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  for spec_kw, up_shape in (({"blocks": 4}, (1, 6, 64)), ({}, (1, 24, 64))):
    # local: k/4 = 6 a device; global: min(k, F/4) = 24 slots a device
    gen = Generator(m.config, m.params, cache_len=64, policy=_stability(m, beta=0.25, **spec_kw),
                    mesh=meshes.make_mesh(4))
    cores = []
    for ids in random_prompts([5, 20, 31], seed=10):   # one bucket, three core sets
      gen.generate_ids([ids], 6)
      state = gen.prefill(gen.params, [ids], 6)
      cores.append(state.core)
      ffn = state.decode_params.layers[1].ffn
      assert {s.data.shape for s in ffn.up_BKD.addressable_shards} == {up_shape}
      assert _spec(ffn.up_BKD) == _spec(ffn.gate_BKD) == (None, "tp", None)
      assert _spec(ffn.down_BDK) == (None, None, "tp")
      tokens, cache = gen.decode(state.decode_params, state.cache, state.tokens_B)
      assert _spec(state.decode_params.layers[0].attn.q_weight) == ("tp", None)
      assert _spec(cache.k[0]) == (None, None, None, None)
    assert gen.compiled.compiles == {"prefill": 1, "gather": 1, "decode": 1}
    assert any(not np.array_equal(a, b) for a, b in zip(cores[0], cores[1]))


def test_shared_core_sets_on_the_mesh_equal_one_device(tiny_llama):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  prompts = random_prompts([6, 15, 11], seed=4)
  for blocks in (1, 4):
    policy = _stability(m, beta=0.5, blocks=blocks, sharing="shared")
    gen = Generator(m.config, m.params, cache_len=64, policy=policy, mesh=meshes.make_mesh(4))
    state = gen.prefill(gen.params, prompts, 6)
    assert _spec(state.decode_params.layers[0].ffn.up_FD) == ("tp", None)
    got, _ = gen.generate_ids(prompts, 8)
    want, _ = Generator(m.config, m.params, cache_len=64, policy=policy).generate_ids(prompts, 8)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.parametrize("blocks,sharing", [(4, "per_sequence"), (1, "per_sequence"), (4, "shared")])
def test_offload_on_the_mesh_equals_resident_keeps_placements_and_the_plan(tiny_llama, blocks, sharing):
  m = loading.load_model(tiny_llama, with_tokenizer=False)
  policy = _stability(m, beta=0.5, blocks=blocks, sharing=sharing)
  mesh = meshes.make_mesh(4)
  gen = Generator(m.config, m.params, cache_len=64, policy=policy, mesh=mesh, offload_ffn=True)
  resident = Generator(m.config, m.params, cache_len=64, policy=policy, mesh=mesh)
  for dense, placed in zip(gen.params.layers, resident.params.layers):   # each shard in its host memory
    assert dense.ffn.up_FD.sharding == placed.ffn.up_FD.sharding.with_memory_kind(offload.HOST)
    assert dense.attn.q_weight.sharding == placed.attn.q_weight.sharding
  prompts = random_prompts([6, 15], seed=5)
  got, stats = gen.generate_ids(prompts, 8)
  want, _ = resident.generate_ids(prompts, 8)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  state, placed = gen.prefill(gen.params, prompts, 8), resident.prefill(resident.params, prompts, 8)
  for a, b in zip(jax.tree_util.tree_leaves(state.decode_params),
                  jax.tree_util.tree_leaves(placed.decode_params)):
    assert a.sharding == b.sharding   # device memory, split as the resident run's
  plan = offload.planned_memory(m.config, policy.spec, np.float32, True, 2, 64, mesh)
  assert stats.memory["device_weight_bytes_peak"] == plan["weights"]
  full_ffns = sum(cost.param_bytes(layer.ffn) for layer in m.params.layers)
  assert stats.memory["host_weight_bytes"] == full_ffns // 4   # a quarter of each FFN a device
