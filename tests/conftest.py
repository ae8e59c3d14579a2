"""Shared fixtures: tiny random Hugging Face models saved as checkpoint folders."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128

TINY_CONFIGS = {
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    # Original context 64 puts one RoPE wavelength (32.4) inside llama3's
    # smoothed band [16, 64], so all three branches of the scaling are exercised.
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 500000.0})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(max_position_embeddings=256)),
    # q/k RMSNorm per head, and a head_dim that is not hidden / heads.
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(max_position_embeddings=256,
                                                              head_dim=24)),
    # A window narrower than the test prompts, on every layer.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    # Sandwich norms, GeGLU, q/k norm, local layers (window 5, their own RoPE
    # base) around a global one with linear RoPE scaling, query_pre_attn_scalar.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=5, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
    "opt_pre_ln": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=96, max_position_embeddings=256)),
    "opt_post_ln_proj": ("OPTConfig", "OPTForCausalLM", dict(
        ffn_dim=96, max_position_embeddings=256, do_layer_norm_before=False, word_embed_proj_dim=32)),
}


def make_tiny_hf_model(name: str, seed: int = 0):
  """A tiny transformers model with every parameter randomised (norm weights
  and biases too, so that a dropped bias or scale would show)."""
  config_cls, model_cls, extra = TINY_CONFIGS[name]
  config = getattr(transformers, config_cls)(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **extra)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1 and "norm" in pname and pname.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5 * 4)
  return model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_checkpoint(request, tmp_path_factory):
  """(name, folder, torch model) for each tiny architecture."""
  model = make_tiny_hf_model(request.param)
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)
  return request.param, folder, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  model = make_tiny_hf_model("llama_tied")
  folder = str(tmp_path_factory.mktemp("llama_tied_single"))
  model.save_pretrained(folder)
  return folder


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_tokenizer(model_folder, folder):
  """A copy of a tiny model folder plus the word-level tokenizer of tests/fixtures."""
  shutil.copytree(model_folder, folder)
  src = os.path.join(REPO, "tests", "fixtures", "tokenizer")
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), folder)
  return folder


@pytest.fixture
def tiny_llama_with_tokenizer(tiny_llama, tmp_path):
  """The tiny Llama folder plus the word-level tokenizer of tests/fixtures."""
  return with_tokenizer(tiny_llama, tmp_path / "with_tokenizer")


def run_script(script, *args, timeout=300):
  """Runs scripts/SCRIPT with `args`, capturing its output."""
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args],
                        capture_output=True, text=True, timeout=timeout)


def run_generate(*args):
  return run_script("generate.py", *args)


# The words of the tests' word-level tokenizer (tests/fixtures/tokenizer) used for random texts.
WORDS = "a b c d e f g h the of and to".split()


def random_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


def assert_greedy_matches_transformers(ours, hf, prompts, steps, stop_ids, min_tokens):
  """Our greedy `Generator` equals transformers' greedy `generate` on each
  prompt, up to the first of `stop_ids`, over at least `min_tokens` tokens."""
  from coreinfer_jax.runtime.generator import Generator
  gen = Generator(ours.config, ours.params, ours.tokenizer, cache_len=256)
  for prompt in prompts:
    ids = gen.encode(prompt)
    (result,), _ = gen.generate_ids([ids], steps)
    with torch.no_grad():
      out = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)[0, len(ids):].tolist()
    stops = [i for i, t in enumerate(out) if t in stop_ids]
    expected = out[:stops[0]] if stops else out
    assert result.token_ids == expected, prompt
    assert len(expected) >= min_tokens, "the comparison should cover a real continuation"
