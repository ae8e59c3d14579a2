"""What the architecture modules share: checks and readings of Hugging Face
config fields, and the attention tensors every architecture names alike."""

from __future__ import annotations

from typing import AbstractSet, Any, Callable, Dict, Mapping, Optional, Protocol, Tuple

import jax

from coreinfer_jax.checkpoint.errors import UnsupportedConfigError
from coreinfer_jax.model.config import Llama3RopeScaling, ModelConfig
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.params import AttentionParams, LayerParams, ModelParams, NormParams


class Take(Protocol):
  """What an architecture's `params(take, config)` asks for tensors with: the
  strict checkpoint reader of `convert`, or its random stand-in."""

  def __call__(self, name: str, shape: Tuple[int, ...]) -> jax.Array:
    """The tensor `name` in `shape`, converted."""

  def maybe(self, name: str, shape: Tuple[int, ...], present: bool) -> Optional[jax.Array]:
    """The tensor where the config says it is `present`, else None."""

  def discard(self, name: str) -> None:
    """Drops a tensor the model does not use, if the checkpoint has it."""


def require(cfg: Mapping[str, Any], name: str, ok: bool, what: str) -> None:
  if not ok:
    raise UnsupportedConfigError(
        f"config field {name!r} = {cfg.get(name)!r} is not supported: {what}")


def eos_ids(value: Any) -> Tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def attention_params(take: Take, c: ModelConfig, prefix: str, o_name: str) -> AttentionParams:
  """`{prefix}.{q,k,v}_proj` and `{prefix}.{o_name}`, weights and the config's
  biases; `{prefix}.{q,k}_norm` with `qk_norm`."""
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
      q_norm_K=take.maybe(f"{prefix}.q_norm.weight", (c.head_dim,), c.qk_norm),
      k_norm_K=take.maybe(f"{prefix}.k_norm.weight", (c.head_dim,), c.qk_norm),
  )


def gated_ffn(take: Take, c: ModelConfig, prefix: str) -> FFNParams:
  """`{prefix}.{gate,up,down}_proj` in the checkpoint's `[out, in]` layout."""
  F, D = c.intermediate_size, c.hidden_size
  return FFNParams(gate_FD=take(f"{prefix}.gate_proj.weight", (F, D)),
                   up_FD=take(f"{prefix}.up_proj.weight", (F, D)),
                   down_DF=take(f"{prefix}.down_proj.weight", (D, F)))


def decoder_params(take: Take, c: ModelConfig, layers: Tuple[LayerParams, ...],
                   final_norm: NormParams) -> ModelParams:
  """`model.embed_tokens` and, unless tied, `lm_head` around the layers."""
  embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
  if c.tie_word_embeddings:
    take.discard("lm_head.weight")
  return ModelParams(
      embed_VE=embed,
      layers=tuple(layers),
      final_norm=final_norm,
      lm_head_VE=None if c.tie_word_embeddings else take("lm_head.weight",
                                                         (c.vocab_size, c.hidden_size)),
  )


def rope_settings(params: Mapping[str, Any], default_theta: float, field: str,
                  ) -> Tuple[float, Optional[Llama3RopeScaling], float]:
  """(theta, llama3 scaling, linear factor) from one RoPE parameter dict
  (`rope_parameters` of transformers 5, or an earlier `rope_scaling`); `field`
  names it in errors."""
  theta = float(params.get("rope_theta", default_theta))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None, 1.0
  if rope_type == "linear":
    return theta, None, float(params["factor"])
  if rope_type == "llama3":
    return theta, Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    ), 1.0
  raise UnsupportedConfigError(
      f"config field {field!r} has rope_type {rope_type!r}: only default, linear "
      "and llama3 RoPE are implemented")


# --- GGUF (llama.cpp) ---------------------------------------------------------

GGUFField = Callable[..., Any]   # (metadata key, default) -> value


def gguf_base_config(model_type: str, arch: str, field: GGUFField,
                     tensor_names: AbstractSet[str]) -> Dict[str, Any]:
  """The Hugging Face config fields every GGUF architecture stores alike,
  from its metadata (`field(key, default)`) and the names of its tensors."""
  heads = int(field(f"{arch}.attention.head_count"))
  hidden = int(field(f"{arch}.embedding_length"))
  head_dim = (field(f"{arch}.attention.key_length") or field(f"{arch}.rope.dimension_count")
              or hidden // heads)
  return {
      "model_type": model_type,
      "vocab_size": int(field(f"{arch}.vocab_size") or len(field("tokenizer.ggml.tokens"))),
      "hidden_size": hidden,
      "intermediate_size": int(field(f"{arch}.feed_forward_length")),
      "num_hidden_layers": int(field(f"{arch}.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
      "head_dim": int(head_dim),
      "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "bos_token_id": field("tokenizer.ggml.bos_token_id"),
      "eos_token_id": field("tokenizer.ggml.eos_token_id"),
  }


# The tensor names llama.cpp gives every decoder alike (each architecture
# adds its own norms and biases).
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_hf_name(name: str, layer_names: Mapping[str, str]) -> str:
  """A GGUF tensor name (`blk.{i}.{x}` or a global name) as its Hugging Face
  name: `GGUF_LAYER_NAMES` and the architecture's own `layer_names`."""
  if name in GGUF_GLOBAL_NAMES:
    return GGUF_GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if parts[0] == "blk" and len(parts) == 3:
    layer_name = layer_names.get(parts[2]) or GGUF_LAYER_NAMES.get(parts[2])
    if layer_name:
      return f"model.layers.{parts[1]}.{layer_name}"
  raise UnsupportedConfigError(f"GGUF tensor {name!r} has no Hugging Face equivalent here")
