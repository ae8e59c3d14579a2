"""Static model configuration, and its conversion from a Hugging Face config.

`ModelConfig` is frozen and hashable so that jitted functions can close over
it (or take it as a static argument) and compile once per configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple


class UnsupportedConfigError(ValueError):
  """A checkpoint's config asks for something this library does not implement."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything about a decoder that decides shapes and arithmetic.

  `family` is "llama" (RMSNorm, RoPE, GQA, SwiGLU; covers Llama 2/3, SmolLM2,
  Mistral and Qwen2) or "opt" (LayerNorm, learned positions, ReLU FFN).
  """
  family: str
  vocab_size: int
  hidden_size: int          # D, the residual width
  intermediate_size: int    # F, FFN neurons per layer
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  tie_word_embeddings: bool
  qkv_bias: bool = False
  o_bias: bool = False
  ffn_bias: bool = False
  # Llama family.
  rope_theta: float = 10000.0
  rope_scaling: Optional[Llama3RopeScaling] = None
  rope_linear_factor: float = 1.0
  sliding_window: Optional[int] = None
  # OPT.
  pre_norm: bool = True
  final_norm: bool = True
  embed_dim: Optional[int] = None   # OPT word_embed_proj_dim when != D
  position_offset: int = 0          # OPT learned positions start at 2
  bos_token_id: Optional[int] = None
  eos_token_ids: Tuple[int, ...] = ()

  @property
  def is_llama(self) -> bool:
    return self.family == "llama"

  @property
  def has_projection(self) -> bool:
    return self.embed_dim is not None and self.embed_dim != self.hidden_size

  @property
  def token_embed_dim(self) -> int:
    return self.embed_dim if self.has_projection else self.hidden_size


LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_MODEL_TYPES + ("opt",)

# Fields that change no arithmetic of inference (training, bookkeeping, tokens).
_IGNORED_FIELDS = frozenset("""
  architectures model_type transformers_version torch_dtype dtype _name_or_path
  use_cache initializer_range init_std attention_dropout dropout layerdrop
  pad_token_id output_attentions output_hidden_states return_dict
  id2label label2id problem_type is_encoder_decoder chunk_size_feed_forward
  pretraining_tp tie_encoder_decoder _attn_implementation_autoset
  max_window_layers use_mrope tokenizer_class prefix bos_token_id eos_token_id
  rope_theta rope_scaling rope_parameters hidden_act activation_function
  hidden_size intermediate_size num_hidden_layers num_attention_heads
  num_key_value_heads head_dim vocab_size max_position_embeddings rms_norm_eps
  tie_word_embeddings attention_bias mlp_bias sliding_window use_sliding_window
  ffn_dim do_layer_norm_before _remove_final_layer_norm word_embed_proj_dim
  enable_bias layer_norm_elementwise_affine layer_types
  torchscript keys_to_ignore_at_inference add_cross_attention cross_attention_hidden_size
  finetuning_task task_specific_params tf_legacy_loss use_bfloat16 chunk_size
  sep_token_id decoder_start_token_id tokenizer_class temperature top_p top_k
  quantization_config _commit_hash base_model_tp_plan base_model_pp_plan
""".split())


def _require(cfg: Mapping[str, Any], name: str, ok: bool, what: str) -> None:
  if not ok:
    raise UnsupportedConfigError(
        f"config field {name!r} = {cfg.get(name)!r} is not supported: {what}")


def _eos_ids(value: Any) -> Tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def _rope_settings(cfg: Mapping[str, Any]) -> Tuple[float, Optional[Llama3RopeScaling], float]:
  """(theta, llama3 scaling, linear factor) from `rope_parameters` (transformers
  5) or `rope_theta` + `rope_scaling` (earlier configs)."""
  params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  field = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
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


def _llama_config(cfg: Mapping[str, Any]) -> ModelConfig:
  model_type = cfg["model_type"]
  act = cfg.get("hidden_act", "silu")
  _require(cfg, "hidden_act", act == "silu", "the Llama family is implemented with SiLU (SwiGLU)")
  _require(cfg, "mlp_bias", not cfg.get("mlp_bias", False), "FFN biases in a Llama-family model")
  if model_type == "qwen2":
    _require(cfg, "use_sliding_window", not cfg.get("use_sliding_window", False),
             "Qwen2 sliding-window attention")
  layer_types = cfg.get("layer_types") or []
  _require(cfg, "layer_types", all(t == "full_attention" for t in layer_types),
           "only full attention layers are implemented")
  num_heads = int(cfg["num_attention_heads"])
  hidden = int(cfg["hidden_size"])
  head_dim = cfg.get("head_dim") or hidden // num_heads
  theta, llama3, linear = _rope_settings(cfg)
  attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
  sliding = cfg.get("sliding_window") if model_type == "mistral" else None
  return ModelConfig(
      family="llama",
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
      head_dim=int(head_dim),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      # Qwen2 has q/k/v biases but no o bias; Llama's attention_bias covers all four.
      qkv_bias=attention_bias,
      o_bias=attention_bias and model_type != "qwen2",
      rope_theta=theta,
      rope_scaling=llama3,
      rope_linear_factor=linear,
      sliding_window=int(sliding) if sliding else None,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
  )


def _opt_config(cfg: Mapping[str, Any]) -> ModelConfig:
  _require(cfg, "activation_function", cfg.get("activation_function", "relu") == "relu",
           "OPT is implemented with ReLU")
  _require(cfg, "enable_bias", cfg.get("enable_bias", True), "OPT without biases")
  _require(cfg, "layer_norm_elementwise_affine", cfg.get("layer_norm_elementwise_affine", True),
           "OPT LayerNorm without affine parameters")
  hidden = int(cfg["hidden_size"])
  num_heads = int(cfg["num_attention_heads"])
  pre_norm = bool(cfg.get("do_layer_norm_before", True))
  embed_dim = int(cfg.get("word_embed_proj_dim") or hidden)
  return ModelConfig(
      family="opt",
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(cfg["ffn_dim"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=num_heads,
      num_kv_heads=num_heads,
      head_dim=hidden // num_heads,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      norm_eps=1e-5,
      tie_word_embeddings=True,
      qkv_bias=True,
      o_bias=True,
      ffn_bias=True,
      pre_norm=pre_norm,
      final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
      embed_dim=embed_dim if embed_dim != hidden else None,
      position_offset=2,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
  )


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """Converts a Hugging Face `config.json` dict; refuses what it cannot run.

  Raises UnsupportedConfigError naming the field for an unsupported model type
  or setting, and for any field it does not know (a new field may change the
  arithmetic, so it is safer to stop than to run a different model).
  """
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedConfigError(
        f"config field 'model_type' = {model_type!r} is not supported "
        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  unknown = sorted(k for k in cfg if k not in _IGNORED_FIELDS)
  if unknown:
    raise UnsupportedConfigError(
        f"config field {unknown[0]!r} = {cfg[unknown[0]]!r} is not supported "
        f"(unknown fields: {', '.join(unknown)})")
  if model_type == "opt":
    return _opt_config(cfg)
  return _llama_config(cfg)
