"""Gemma 3 (text): RMSNorm before and after each block ("sandwich"), stored
as `w` with scale `1 + w`; RMSNorm over each head's q and k; GeGLU FFN (tanh
GELU); local layers attending within a sliding window with their own RoPE
base, every `sliding_window_pattern`-th layer global; embeddings scaled by
√D; attention scaled by `query_pre_attn_scalar ** -0.5`; tied embeddings.

Its Hugging Face config -> `ModelConfig`, its Hugging Face tensor names ->
`ModelParams`, and llama.cpp's `gemma3` GGUF names and metadata (norm
weights stored as `1 + w`, Q/K in the Hugging Face layout).
"""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, List, Mapping

import numpy as np

from coreinfer_jax.checkpoint.common import (GGUFField, Take, attention_params,
                                             decoder_params, eos_ids, gated_ffn,
                                             gguf_base_config, gguf_hf_name, require,
                                             rope_settings)
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import LayerParams, ModelParams, NormParams

MODEL_TYPES = ("gemma3_text",)
# The config fields this module reads or checks.
KNOWN_FIELDS = frozenset("""
  vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
  num_key_value_heads head_dim max_position_embeddings rms_norm_eps tie_word_embeddings
  hidden_activation hidden_act attention_bias rope_theta rope_local_base_freq rope_scaling
  rope_parameters query_pre_attn_scalar sliding_window sliding_window_pattern
  _sliding_window_pattern layer_types final_logit_softcapping attn_logit_softcapping
  use_bidirectional_attention cache_implementation
""".split())
GGUF_ARCHITECTURES = ("gemma3",)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _layer_types(cfg: Mapping[str, Any]) -> List[str]:
  """Per layer "sliding_attention" or "full_attention" (`layer_types`, or
  every `sliding_window_pattern`-th layer global, as transformers)."""
  num_layers = int(cfg["num_hidden_layers"])
  types = cfg.get("layer_types")
  if types is None:
    pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
             for i in range(num_layers)]
  require(cfg, "layer_types", len(types) == num_layers and
          set(types) <= {"sliding_attention", "full_attention"},
          "one of sliding_attention/full_attention per layer")
  return list(types)


def _rope_parameters(cfg: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """RoPE parameters per layer type: transformers 5's nested
  `rope_parameters`, or `rope_theta`, `rope_local_base_freq`, `rope_scaling`."""
  nested = cfg.get("rope_parameters")
  if nested is not None:
    require(cfg, "rope_parameters", set(nested) <= set(_DEFAULT_THETA),
            "Gemma 3 RoPE parameters are given per layer type")
    return {t: dict(nested.get(t) or {}) for t in _DEFAULT_THETA}
  full = dict(cfg.get("rope_scaling") or {})
  full.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULT_THETA["full_attention"]))
  local = {"rope_theta": cfg.get("rope_local_base_freq", _DEFAULT_THETA["sliding_attention"])}
  return {"full_attention": full, "sliding_attention": local}


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """The `ModelConfig` of a Gemma 3 text config dict whose fields
  `architectures.config_from_hf` has already checked are all known."""
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
  require(cfg, "hidden_activation", act in _GELU_TANH, "Gemma 3 is implemented with tanh GELU")
  for name in ("final_logit_softcapping", "attn_logit_softcapping"):
    require(cfg, name, cfg.get(name) is None, "logit soft-capping")
  require(cfg, "use_bidirectional_attention", not cfg.get("use_bidirectional_attention"),
          "bidirectional attention")
  require(cfg, "attention_bias", not cfg.get("attention_bias", False), "attention biases")
  hidden = int(cfg["hidden_size"])
  num_heads = int(cfg["num_attention_heads"])
  head_dim = int(cfg.get("head_dim") or hidden // num_heads)
  rope = _rope_parameters(cfg)
  theta, llama3, linear = rope_settings(rope["full_attention"], _DEFAULT_THETA["full_attention"],
                                        "rope_parameters")
  local_theta, local_llama3, local_linear = rope_settings(
      rope["sliding_attention"], _DEFAULT_THETA["sliding_attention"], "rope_parameters")
  require(cfg, "rope_parameters", local_llama3 is None and local_linear == 1.0,
          "scaled RoPE on sliding-window layers")
  window = int(cfg.get("sliding_window") or 4096)
  return ModelConfig(
      model_type=cfg["model_type"],
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
      head_dim=head_dim,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
      norm="rms",
      norm_placement="sandwich",
      final_norm=True,
      ffn_activation="gelu_tanh_gated",
      positions="rope",
      qk_norm=True,
      rope_theta=theta,
      rope_scaling=llama3,
      rope_linear_factor=linear,
      local_rope_theta=local_theta,
      layer_windows=tuple(window if t == "sliding_attention" else None for t in _layer_types(cfg)),
      query_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
      embed_scale=hidden ** 0.5,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=eos_ids(cfg.get("eos_token_id")),
  )


def _norm(take: Take, name: str, size: int) -> NormParams:
  """A Gemma RMSNorm: the checkpoint stores w, the scale is 1 + w."""
  return NormParams(take(name, (size,)) + 1)


def params(take: Take, c: ModelConfig) -> ModelParams:
  """Parameters from the Hugging Face tensor names (`model.layers.{i}...`)."""
  D = c.hidden_size
  layers = []
  for i in range(c.num_layers):
    p = f"model.layers.{i}"
    attn = attention_params(take, c, f"{p}.self_attn", "o_proj")
    layers.append(LayerParams(
        attn_norm=_norm(take, f"{p}.input_layernorm.weight", D),
        attn=attn.replace(q_norm_K=attn.q_norm_K + 1, k_norm_K=attn.k_norm_K + 1),
        attn_out_norm=_norm(take, f"{p}.post_attention_layernorm.weight", D),
        ffn_norm=_norm(take, f"{p}.pre_feedforward_layernorm.weight", D),
        ffn=gated_ffn(take, c, f"{p}.mlp"),
        ffn_out_norm=_norm(take, f"{p}.post_feedforward_layernorm.weight", D),
    ))
  return decoder_params(take, c, tuple(layers), _norm(take, "model.norm.weight", D))


# --- GGUF (llama.cpp) ---------------------------------------------------------

# Beyond `common.GGUF_LAYER_NAMES`.
_GGUF_LAYER_NAMES = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def hf_config_from_gguf(arch: str, field: GGUFField,
                        tensor_names: AbstractSet[str]) -> Dict[str, Any]:
  """The Hugging Face config dict of a `gemma3` GGUF file. llama.cpp stores
  neither the local RoPE base nor the window pattern nor the query scale; it
  uses 10000, every 6th layer global and head_dim (for every size but 27B,
  whose scale is hidden/heads), as transformers' defaults do."""
  config = gguf_base_config("gemma3_text", arch, field, tensor_names)
  return dict(config,
              sliding_window=int(field(f"{arch}.attention.sliding_window")),
              query_pre_attn_scalar=(config["hidden_size"] // config["num_attention_heads"]
                                     if config["num_hidden_layers"] == 62 else config["head_dim"]))


def hf_name_from_gguf(name: str) -> str:
  return gguf_hf_name(name, _GGUF_LAYER_NAMES)


def to_hf_layout(gguf_name: str, array: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
  """llama.cpp stores Gemma's norm weights as 1 + w; Hugging Face stores w."""
  return array - 1 if gguf_name.endswith("norm.weight") else array
