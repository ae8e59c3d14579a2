"""GGUF files (llama.cpp) -> (Hugging Face-style config dict, Hugging
Face-named lazy tensors).

The header is parsed once (`gguf_file.open_gguf`, which refuses a truncated
or malformed file in one line). The module registered for its
`general.architecture` (`architectures.gguf_architecture`) turns the
metadata into a config dict and each tensor name into its Hugging Face name;
a tensor is dequantized by the `gguf` package and put back into the Hugging
Face layout only when the converter takes it.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from coreinfer_jax.checkpoint.architectures import gguf_architecture
from coreinfer_jax.checkpoint.convert import TensorGetter
from coreinfer_jax.checkpoint.gguf_file import GGUFFile, TensorInfo, open_gguf


def read_gguf(path: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  gguf = open_gguf(path)
  arch = gguf.field("general.architecture")
  module = gguf_architecture(arch)
  config = module.hf_config_from_gguf(arch, gguf.field, {t.name for t in gguf.tensors})
  tensors = {module.hf_name_from_gguf(t.name): functools.partial(_read, gguf, t, module, config)
             for t in gguf.tensors}
  return config, tensors


def _read(gguf: GGUFFile, tensor: TensorInfo, module: types.ModuleType,
          hf_config: Mapping[str, Any]) -> np.ndarray:
  return module.to_hf_layout(tensor.name, gguf.read(tensor), hf_config)
