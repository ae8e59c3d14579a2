"""The named real models beyond SmolLM2 (Qwen2.5-Coder-0.5B: GGUF `qwen2`;
Gemma 3 270M: GGUF `gemma3`) against transformers' own GGUF loading. The
1.5B Qwen shares the 0.5B's architecture and is left to the benchmarks (CI
time)."""

import os

import chex
import jax.numpy as jnp
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.checkpoint import named, params_from_hf_tensors
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import Generator
from tests.conftest import assert_greedy_matches_transformers

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

MODELS = ("qwen2.5-coder-0.5b", "gemma-3-270m")
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,",
           "def fibonacci(n):"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
  """(our LoadedModel, transformers' model from the same GGUF)."""
  from transformers import AutoModelForCausalLM
  path = named.model_path(request.param)
  ours = loading.load_model(path)
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  return ours, hf


def test_gguf_tensors_equal_transformers_gguf_loading(pair):
  ours, hf = pair
  state = {k: (lambda v=v: v.numpy()) for k, v in hf.state_dict().items()}
  reference = params_from_hf_tensors(ours.config, state, jnp.float32)
  chex.assert_trees_all_close(ours.params, reference, rtol=0, atol=1e-6)


def test_greedy_generation_matches_transformers(pair):
  ours, hf = pair
  assert_greedy_matches_transformers(ours, hf, PROMPTS, 24, ours.config.eos_token_ids, min_tokens=16)


def test_beta_one_equals_dense(pair):
  ours, _ = pair
  c = ours.config
  dense = Generator(c, ours.params, ours.tokenizer, cache_len=128)
  sparse = Generator(c, ours.params, ours.tokenizer, cache_len=128, policy=Stability(
      core_spec(c.num_layers, c.intermediate_size, beta=1.0, sparse_layers="all")))
  ids = [dense.encode(p) for p in PROMPTS]
  expected, _ = dense.generate_ids(ids, 16)
  got, stats = sparse.generate_ids(ids, 16)
  assert [r.token_ids for r in got] == [r.token_ids for r in expected]
  assert stats.ffn_bytes_fraction == 1.0
