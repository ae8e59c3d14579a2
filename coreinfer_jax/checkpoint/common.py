"""What the architecture modules share: checks and readings of Hugging Face
config fields, and the attention tensors every architecture names alike."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Tuple

import jax

from coreinfer_jax.checkpoint.errors import UnsupportedConfigError
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import AttentionParams


class Take(Protocol):
  """What an architecture's `params(take, config)` asks for tensors with: the
  strict checkpoint reader of `convert`, or its random stand-in."""

  def __call__(self, name: str, shape: Tuple[int, ...], transpose: bool = False) -> jax.Array:
    """The tensor `name` (transposed if asked) in `shape`, converted."""

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
