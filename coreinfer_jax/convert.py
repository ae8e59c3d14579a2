"""Hugging Face tensor names -> `ModelParams`, strictly.

Both loaders (safetensors folders and GGUF files) reduce a checkpoint to a
mapping from Hugging Face tensor names to lazy array getters; this module
takes every expected key exactly once, checks its shape, and fails on any
missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.config import ModelConfig
from coreinfer_jax.params import AttentionParams, FFNParams, LayerParams, ModelParams, NormParams

TensorGetter = Callable[[], np.ndarray]

# Buffers some checkpoints carry that hold no weights.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match its config."""


class _Taker:
  """Pops tensors by name, checking shapes, and converts them to `dtype`."""

  def __init__(self, tensors: Mapping[str, TensorGetter], dtype):
    self._tensors = dict(tensors)
    self._dtype = dtype

  def __call__(self, name: str, shape: Tuple[int, ...], transpose: bool = False) -> jax.Array:
    if name not in self._tensors:
      raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    array = np.asarray(self._tensors.pop(name)())
    if transpose:
      array = array.T
    if tuple(array.shape) != tuple(shape):
      raise CheckpointError(
          f"tensor {name!r} has shape {tuple(array.shape)}{' (transposed)' if transpose else ''}, "
          f"expected {tuple(shape)}")
    return jnp.asarray(np.ascontiguousarray(array), dtype=self._dtype)

  def maybe(self, name: str, shape: Tuple[int, ...], present: bool) -> Optional[jax.Array]:
    return self(name, shape) if present else None

  def discard(self, name: str) -> None:
    self._tensors.pop(name, None)

  def finish(self) -> None:
    leftover = sorted(k for k in self._tensors if not _IGNORABLE.match(k))
    if leftover:
      raise CheckpointError(
          f"checkpoint has {len(leftover)} unexpected tensor(s), e.g. {leftover[:3]}")


def _canonical_names(tensors: Mapping[str, TensorGetter]) -> Dict[str, TensorGetter]:
  """Some OPT checkpoints omit the leading `model.`."""
  return {("model." + k if k.startswith("decoder.") else k): v for k, v in tensors.items()}


def _attention(take: _Taker, c: ModelConfig, prefix: str, o_name: str) -> AttentionParams:
  D, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return AttentionParams(
      q_weight=take(f"{prefix}.q_proj.weight", (q_dim, D)),
      k_weight=take(f"{prefix}.k_proj.weight", (kv_dim, D)),
      v_weight=take(f"{prefix}.v_proj.weight", (kv_dim, D)),
      o_weight=take(f"{prefix}.{o_name}.weight", (D, q_dim)),
      q_bias=take.maybe(f"{prefix}.q_proj.bias", (q_dim,), c.qkv_bias),
      k_bias=take.maybe(f"{prefix}.k_proj.bias", (kv_dim,), c.qkv_bias),
      v_bias=take.maybe(f"{prefix}.v_proj.bias", (kv_dim,), c.qkv_bias),
      o_bias=take.maybe(f"{prefix}.{o_name}.bias", (D,), c.o_bias),
  )


def _llama_params(take: _Taker, c: ModelConfig) -> ModelParams:
  D, F = c.hidden_size, c.intermediate_size
  layers = []
  for i in range(c.num_layers):
    p = f"model.layers.{i}"
    layers.append(LayerParams(
        attn_norm=NormParams(take(f"{p}.input_layernorm.weight", (D,))),
        attn=_attention(take, c, f"{p}.self_attn", "o_proj"),
        ffn_norm=NormParams(take(f"{p}.post_attention_layernorm.weight", (D,))),
        ffn=FFNParams(
            gate_FD=take(f"{p}.mlp.gate_proj.weight", (F, D)),
            up_FD=take(f"{p}.mlp.up_proj.weight", (F, D)),
            down_FD=take(f"{p}.mlp.down_proj.weight", (F, D), transpose=True),
        ),
    ))
  embed = take("model.embed_tokens.weight", (c.vocab_size, D))
  if c.tie_word_embeddings:
    take.discard("lm_head.weight")
  return ModelParams(
      embed_VE=embed,
      layers=tuple(layers),
      final_norm=NormParams(take("model.norm.weight", (D,))),
      lm_head_VE=None if c.tie_word_embeddings else take("lm_head.weight", (c.vocab_size, D)),
  )


def _opt_params(take: _Taker, c: ModelConfig) -> ModelParams:
  D, F, E = c.hidden_size, c.intermediate_size, c.token_embed_dim

  def layer_norm(name: str) -> NormParams:
    return NormParams(take(f"{name}.weight", (D,)), take(f"{name}.bias", (D,)))

  layers = []
  for i in range(c.num_layers):
    p = f"model.decoder.layers.{i}"
    layers.append(LayerParams(
        attn_norm=layer_norm(f"{p}.self_attn_layer_norm"),
        attn=_attention(take, c, f"{p}.self_attn", "out_proj"),
        ffn_norm=layer_norm(f"{p}.final_layer_norm"),
        ffn=FFNParams(
            up_FD=take(f"{p}.fc1.weight", (F, D)),
            up_bias_F=take(f"{p}.fc1.bias", (F,)),
            down_FD=take(f"{p}.fc2.weight", (F, D), transpose=True),
            down_bias_D=take(f"{p}.fc2.bias", (D,)),
        ),
    ))
  take.discard("lm_head.weight")   # OPT always ties the output projection
  return ModelParams(
      embed_VE=take("model.decoder.embed_tokens.weight", (c.vocab_size, E)),
      layers=tuple(layers),
      final_norm=layer_norm("model.decoder.final_layer_norm") if c.final_norm else None,
      positions_PD=take("model.decoder.embed_positions.weight",
                        (c.max_position_embeddings + c.position_offset, D)),
      project_in_DE=take.maybe("model.decoder.project_in.weight", (D, E), c.has_projection),
      project_out_ED=take.maybe("model.decoder.project_out.weight", (E, D), c.has_projection),
  )


def params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, TensorGetter], dtype) -> ModelParams:
  """Builds parameters from Hugging Face-named tensor getters, strictly."""
  take = _Taker(_canonical_names(tensors), dtype)
  params = _llama_params(take, config) if config.is_llama else _opt_params(take, config)
  take.finish()
  return params


class _RandomTaker(_Taker):
  """Stands in for a checkpoint: every requested tensor is random in its shape
  (norm scales one), so random models share the real converter's layout."""

  def __init__(self, seed: int, dtype):
    super().__init__({}, dtype)
    self._key = jax.random.key(seed)
    self._count = 0

  def __call__(self, name: str, shape: Tuple[int, ...], transpose: bool = False) -> jax.Array:
    self._count += 1
    if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
      return jnp.ones(shape, self._dtype)
    return _normal(jax.random.fold_in(self._key, self._count), shape, self._dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_params(config: ModelConfig, seed: int, dtype) -> ModelParams:
  """Random weights in the real shapes of `config` (for speed work)."""
  take = _RandomTaker(seed, dtype)
  return _llama_params(take, config) if config.is_llama else _opt_params(take, config)
