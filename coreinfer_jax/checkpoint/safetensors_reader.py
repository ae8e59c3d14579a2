"""Hugging Face checkpoint folders: `config.json` and `*.safetensors` (one file
or shards) -> (config dict, Hugging Face-named lazy tensors).

Each file is opened once: the config is parsed, each shard's header is read
and its handle kept, and a tensor is read from that handle (as float32) only
when the converter takes it.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any, Dict, Tuple

import numpy as np

from coreinfer_jax.checkpoint.convert import TensorGetter


def read_folder(folder: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
  with open(config_path) as fh:
    return json.load(fh), _tensors(folder)


def _tensors(folder: str) -> Dict[str, TensorGetter]:
  from safetensors import safe_open
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {folder}")
  tensors: Dict[str, TensorGetter] = {}
  for f in files:
    handle = safe_open(f, framework="flax")   # closed when the last getter is dropped
    for name in handle.keys():
      if name in tensors:
        raise ValueError(f"tensor {name!r} appears in more than one shard of {folder}")
      tensors[name] = functools.partial(_read, handle, name)
  return tensors


def _read(handle, name: str) -> np.ndarray:
  return np.asarray(handle.get_tensor(name).astype("float32"))
