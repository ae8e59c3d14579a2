"""Hugging Face tensor names -> `ModelParams`, strictly.

Both readers (safetensors folders and GGUF files) reduce a checkpoint to a
mapping from Hugging Face tensor names to lazy array getters; the
architecture's module (picked by `config.model_type` in `architectures`)
names the tensors it expects, and this module takes each exactly once,
checks its shape, and fails on any missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from coreinfer_jax.checkpoint.architectures import architecture
from coreinfer_jax.checkpoint.errors import CheckpointError
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams

TensorGetter = Callable[[], np.ndarray]

# Buffers some checkpoints carry that hold no weights.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


class _Taker:
  """Pops tensors by name, checking shapes, and converts them to `dtype`."""

  def __init__(self, tensors: Mapping[str, TensorGetter], dtype):
    self._tensors = dict(tensors)
    self._dtype = dtype

  def __call__(self, name: str, shape: Tuple[int, ...]) -> jax.Array:
    if name not in self._tensors:
      raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    array = np.asarray(self._tensors.pop(name)())
    if tuple(array.shape) != tuple(shape):
      raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
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


def params_from_hf_tensors(config: ModelConfig, tensors: Mapping[str, TensorGetter], dtype) -> ModelParams:
  """Builds parameters from Hugging Face-named tensor getters, strictly."""
  take = _Taker(_canonical_names(tensors), dtype)
  params = architecture(config.model_type).params(take, config)
  take.finish()
  return params


class _RandomTaker(_Taker):
  """Stands in for a checkpoint: every requested tensor is random in its shape
  (norm scales one), so random models share the real converter's layout."""

  def __init__(self, seed: int, dtype):
    super().__init__({}, dtype)
    self._key = jax.random.key(seed)
    self._count = 0

  def __call__(self, name: str, shape: Tuple[int, ...]) -> jax.Array:
    self._count += 1
    if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
      return jnp.ones(shape, self._dtype)
    return _normal(jax.random.fold_in(self._key, self._count), shape, self._dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_params(config: ModelConfig, seed: int, dtype) -> ModelParams:
  """Random weights in the real shapes of `config` (for speed work)."""
  return architecture(config.model_type).params(_RandomTaker(seed, dtype), config)
