"""Static model configuration: the architecture as explicit fields.

`ModelConfig` is frozen and hashable so that jitted functions can close over
it (or take it as a static argument) and compile once per configuration.
Every arithmetic choice of the decoder is a field here (norm kind and
placement, FFN activation, position encoding, q/k norm, biases, tied
embeddings, per-layer attention windows), so the model code never asks which family a
checkpoint came from; `checkpoint/` turns each architecture's Hugging Face
config into these fields.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

NORMS = ("rms", "layer")                   # RMSNorm | LayerNorm (with bias)
# "pre": before each block (Llama, OPT-350m+); "post": after the residual add
# (OPT post-LN); "sandwich": before each block and on its output before the
# residual add (Gemma 2/3).
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# SwiGLU: silu(x gateᵀ) * (x upᵀ) | GeGLU: gelu_tanh(x gateᵀ) * (x upᵀ) | relu(x upᵀ + b)
FFN_ACTIVATIONS = ("silu_gated", "gelu_tanh_gated", "relu")
POSITIONS = ("rope", "learned")            # rotary (half-rotation layout) | learned table (OPT)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything about a decoder that decides shapes and arithmetic."""
  model_type: str            # the checkpoint's architecture (checkpoint/ picks its tensor names)
  vocab_size: int
  hidden_size: int           # D, the residual width
  intermediate_size: int     # F, FFN neurons per layer
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  tie_word_embeddings: bool
  norm: str = "rms"
  norm_placement: str = "pre"
  final_norm: bool = True
  ffn_activation: str = "silu_gated"
  positions: str = "rope"
  qk_norm: bool = False      # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
  qkv_bias: bool = False
  o_bias: bool = False
  ffn_bias: bool = False
  # Rotary positions.
  rope_theta: float = 10000.0
  rope_scaling: Optional[Llama3RopeScaling] = None
  rope_linear_factor: float = 1.0
  # The RoPE base of layers with an attention window, which are not scaled
  # (Gemma 3's local layers); None: every layer uses rope_theta and its scaling.
  local_rope_theta: Optional[float] = None
  # Per layer, the attention window W: a query attends to the W most recent
  # positions, itself included (None: every earlier position in the cache).
  layer_windows: Tuple[Optional[int], ...] = ()
  # Attention scores are q·k times this (None: head_dim ** -0.5; Gemma:
  # query_pre_attn_scalar ** -0.5).
  query_scale: Optional[float] = None
  # Token embeddings are multiplied by this, in the parameters' dtype (Gemma: √D).
  embed_scale: float = 1.0
  # Learned positions and embedding projections (OPT).
  embed_dim: Optional[int] = None    # token embedding width E when != D
  position_offset: int = 0           # OPT learned positions start at 2
  bos_token_id: Optional[int] = None
  eos_token_ids: Tuple[int, ...] = ()

  def __post_init__(self):
    for name, allowed in (("norm", NORMS), ("norm_placement", NORM_PLACEMENTS),
                          ("ffn_activation", FFN_ACTIVATIONS), ("positions", POSITIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: expected one of {allowed}")
    if self.layer_windows and len(self.layer_windows) != self.num_layers:
      raise ValueError(f"ModelConfig.layer_windows has {len(self.layer_windows)} entries for "
                       f"{self.num_layers} layers")

  @property
  def has_projection(self) -> bool:
    return self.embed_dim is not None and self.embed_dim != self.hidden_size

  @property
  def token_embed_dim(self) -> int:
    return self.embed_dim if self.has_projection else self.hidden_size

  def layer_window(self, layer: int) -> Optional[int]:
    return self.layer_windows[layer] if self.layer_windows else None
