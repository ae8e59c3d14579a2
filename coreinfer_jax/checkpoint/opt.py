"""OPT: LayerNorm before or after each block, learned positions, ReLU FFN with
biases, tied output embedding, an optional embedding projection.

Its Hugging Face config -> `ModelConfig` and its Hugging Face tensor names ->
`ModelParams`. OPT has no GGUF conversion.
"""

from __future__ import annotations

from typing import Any, Mapping

from coreinfer_jax.checkpoint.common import Take, attention_params, eos_ids, require
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.params import LayerParams, ModelParams, NormParams

MODEL_TYPES = ("opt",)
# The config fields this module reads or checks.
KNOWN_FIELDS = frozenset("""
  vocab_size hidden_size ffn_dim num_hidden_layers num_attention_heads
  max_position_embeddings activation_function do_layer_norm_before
  _remove_final_layer_norm word_embed_proj_dim enable_bias layer_norm_elementwise_affine
""".split())
GGUF_ARCHITECTURES = ()


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """The `ModelConfig` of an OPT config dict whose fields
  `architectures.config_from_hf` has already checked are all known."""
  require(cfg, "activation_function", cfg.get("activation_function", "relu") == "relu",
          "OPT is implemented with ReLU")
  require(cfg, "enable_bias", cfg.get("enable_bias", True), "OPT without biases")
  require(cfg, "layer_norm_elementwise_affine", cfg.get("layer_norm_elementwise_affine", True),
          "OPT LayerNorm without affine parameters")
  num_layers = int(cfg["num_hidden_layers"])
  hidden = int(cfg["hidden_size"])
  num_heads = int(cfg["num_attention_heads"])
  pre_norm = bool(cfg.get("do_layer_norm_before", True))
  embed_dim = int(cfg.get("word_embed_proj_dim") or hidden)
  return ModelConfig(
      model_type="opt",
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=hidden,
      intermediate_size=int(cfg["ffn_dim"]),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_heads,
      head_dim=hidden // num_heads,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      norm_eps=1e-5,
      tie_word_embeddings=True,
      norm="layer",
      norm_placement="pre" if pre_norm else "post",
      final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
      ffn_activation="relu",
      positions="learned",
      qkv_bias=True,
      o_bias=True,
      ffn_bias=True,
      layer_windows=(None,) * num_layers,
      embed_dim=embed_dim if embed_dim != hidden else None,
      position_offset=2,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=eos_ids(cfg.get("eos_token_id")),
  )


def params(take: Take, c: ModelConfig) -> ModelParams:
  """Parameters from the Hugging Face tensor names (`model.decoder...`)."""
  D, F, E = c.hidden_size, c.intermediate_size, c.token_embed_dim

  def layer_norm(name: str) -> NormParams:
    return NormParams(take(f"{name}.weight", (D,)), take(f"{name}.bias", (D,)))

  layers = []
  for i in range(c.num_layers):
    p = f"model.decoder.layers.{i}"
    layers.append(LayerParams(
        attn_norm=layer_norm(f"{p}.self_attn_layer_norm"),
        attn=attention_params(take, c, f"{p}.self_attn", "out_proj"),
        ffn_norm=layer_norm(f"{p}.final_layer_norm"),
        ffn=FFNParams(
            up_FD=take(f"{p}.fc1.weight", (F, D)),
            up_bias_F=take(f"{p}.fc1.bias", (F,)),
            down_DF=take(f"{p}.fc2.weight", (D, F)),
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
