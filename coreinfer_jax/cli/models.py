"""Models for the scripts: a checkpoint, or random weights in a named real shape."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

from coreinfer_jax import checkpoint
from coreinfer_jax.cli.app import load_named_config
from coreinfer_jax.model.config import ModelConfig


def model_fingerprint(model: Optional[str], shape: Optional[str] = None, seed: int = 0) -> str:
  """What `load` will report as the model's fingerprint, without loading it."""
  if shape:
    return f"random:{shape}:{seed}"
  return checkpoint.fingerprint(checkpoint.model_path(model))


def shape_hf_config(configs_dir: str, shape: str, num_layers: Optional[int] = None) -> Dict[str, Any]:
  """A model shape's Hugging Face config dict (`configs/shapes/NAME.json`)."""
  hf = load_named_config(os.path.join(configs_dir, "shapes"), shape)
  return dict(hf, num_hidden_layers=num_layers) if num_layers else hf


def model_config(model: Optional[str], shape: Optional[str] = None, configs_dir: str = "",
                 num_layers: Optional[int] = None) -> ModelConfig:
  """The config alone, cheaply: settings are checked against it before loading."""
  if shape:
    return checkpoint.config_from_hf(shape_hf_config(configs_dir, shape, num_layers))
  return checkpoint.load_config(model)


def load(model: Optional[str], dtype, shape: Optional[str] = None, configs_dir: str = "",
         num_layers: Optional[int] = None, seed: int = 0, with_tokenizer: bool = True):
  """(LoadedModel, load seconds). A `shape` gives random weights, no tokenizer."""
  t0 = time.perf_counter()
  if shape:
    config = model_config(model, shape, configs_dir, num_layers)
    m = checkpoint.LoadedModel(config, checkpoint.random_params(config, seed, dtype), None,
                               f"random:{shape}", model_fingerprint(model, shape, seed))
  else:
    m = checkpoint.load_model(model, dtype, with_tokenizer)
  return m, time.perf_counter() - t0
