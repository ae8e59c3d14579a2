"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3): RMSNorm before
each block, RoPE, grouped-query attention, SwiGLU FFN; Qwen3 adds an RMSNorm
over each head's q and k (`qk_norm`).

Its Hugging Face config -> `ModelConfig`, its Hugging Face tensor names ->
`ModelParams`, and llama.cpp's GGUF names and layout, which reduce a GGUF
file to the same Hugging Face config and tensors.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Dict, Mapping, Optional, Tuple

import numpy as np

from coreinfer_jax.checkpoint.common import (GGUFField, Take, attention_params,
                                             decoder_params, eos_ids, gated_ffn,
                                             gguf_base_config, gguf_hf_name, require,
                                             rope_settings)
from coreinfer_jax.checkpoint.errors import UnsupportedConfigError
from coreinfer_jax.model.config import Llama3RopeScaling, ModelConfig
from coreinfer_jax.model.params import LayerParams, ModelParams, NormParams

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The config fields this module reads or checks.
KNOWN_FIELDS = frozenset("""
  vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
  num_key_value_heads head_dim max_position_embeddings rms_norm_eps tie_word_embeddings
  hidden_act mlp_bias attention_bias rope_theta rope_scaling rope_parameters
  sliding_window use_sliding_window max_window_layers use_mrope layer_types
""".split())
# llama.cpp architectures; `llama` stores Q/K rows permuted for its
# interleaved RoPE, `qwen2` (NEOX RoPE) as Hugging Face does.
GGUF_ARCHITECTURES = ("llama", "qwen2")


def _rope_settings(cfg: Mapping[str, Any]) -> Tuple[float, Optional[Llama3RopeScaling], float]:
  """(theta, llama3 scaling, linear factor) from `rope_parameters` (transformers
  5) or `rope_theta` + `rope_scaling` (earlier configs)."""
  field = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
  return rope_settings(dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}),
                       float(cfg.get("rope_theta", 10000.0)), field)


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """The `ModelConfig` of a Llama-family config dict whose fields
  `architectures.config_from_hf` has already checked are all known."""
  model_type = cfg["model_type"]
  act = cfg.get("hidden_act", "silu")
  require(cfg, "hidden_act", act == "silu", "the Llama family is implemented with SiLU (SwiGLU)")
  require(cfg, "mlp_bias", not cfg.get("mlp_bias", False), "FFN biases in a Llama-family model")
  if model_type in ("qwen2", "qwen3"):
    require(cfg, "use_sliding_window", not cfg.get("use_sliding_window", False),
            "Qwen sliding-window attention")
  layer_types = cfg.get("layer_types") or []
  require(cfg, "layer_types", all(t == "full_attention" for t in layer_types),
          "only full attention layers are implemented")
  num_layers = int(cfg["num_hidden_layers"])
  num_heads = int(cfg["num_attention_heads"])
  hidden = int(cfg["hidden_size"])
  head_dim = cfg.get("head_dim") or hidden // num_heads
  theta, llama3, linear = _rope_settings(cfg)
  attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
  sliding = cfg.get("sliding_window") if model_type == "mistral" else None
  return ModelConfig(
      model_type=model_type,
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      norm="rms",
      norm_placement="pre",
      final_norm=True,
      ffn_activation="silu_gated",
      positions="rope",
      qk_norm=model_type == "qwen3",
      # Qwen2 has q/k/v biases but no o bias; Llama's attention_bias covers all four.
      qkv_bias=attention_bias,
      o_bias=attention_bias and model_type != "qwen2",
      rope_theta=theta,
      rope_scaling=llama3,
      rope_linear_factor=linear,
      # Mistral's sliding window applies to every layer.
      layer_windows=(int(sliding) if sliding else None,) * num_layers,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=eos_ids(cfg.get("eos_token_id")),
  )


def params(take: Take, c: ModelConfig) -> ModelParams:
  """Parameters from the Hugging Face tensor names (`model.layers.{i}...`)."""
  D = c.hidden_size
  layers = tuple(LayerParams(
      attn_norm=NormParams(take(f"model.layers.{i}.input_layernorm.weight", (D,))),
      attn=attention_params(take, c, f"model.layers.{i}.self_attn", "o_proj"),
      ffn_norm=NormParams(take(f"model.layers.{i}.post_attention_layernorm.weight", (D,))),
      ffn=gated_ffn(take, c, f"model.layers.{i}.mlp"),
  ) for i in range(c.num_layers))
  return decoder_params(take, c, layers, NormParams(take("model.norm.weight", (D,))))


# --- GGUF (llama.cpp) ---------------------------------------------------------

# Beyond `common.GGUF_LAYER_NAMES`.
_GGUF_LAYER_NAMES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_config_from_gguf(arch: str, field: GGUFField,
                        tensor_names: AbstractSet[str]) -> Dict[str, Any]:
  """The Hugging Face config dict of a GGUF file, from its metadata
  (`field(key, default)`) and the names of its tensors."""
  if "rope_freqs.weight" in tensor_names:
    raise UnsupportedConfigError("GGUF tensor 'rope_freqs.weight' (llama3 RoPE factors) is not supported; "
                                 "load the Hugging Face folder instead")
  return dict(gguf_base_config(arch, arch, field, tensor_names),
              attention_bias="blk.0.attn_q.bias" in tensor_names)


def hf_name_from_gguf(name: str) -> str:
  return gguf_hf_name(name, _GGUF_LAYER_NAMES)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of Q/K for its interleaved RoPE."""
  rows, cols = w.shape
  return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_hf_layout(gguf_name: str, array: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
  """A dequantized GGUF tensor in its Hugging Face layout: `llama`'s Q and K
  rows unpermuted, every other tensor as it is."""
  if hf_config["model_type"] != "llama":
    return array
  heads = {"attn_q.weight": hf_config["num_attention_heads"],
           "attn_k.weight": hf_config["num_key_value_heads"]}.get(gguf_name.split(".", 2)[-1])
  return unpermute_qk(array, heads) if heads else array
