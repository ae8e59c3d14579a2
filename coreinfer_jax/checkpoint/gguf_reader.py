"""GGUF files (llama.cpp) -> (Hugging Face-style config dict, Hugging
Face-named lazy tensors).

The file is parsed once (`gguf.GGUFReader` maps it). The module registered
for its `general.architecture` (`architectures.gguf_architecture`; only
`llama` is) turns the metadata into a config dict and each tensor name into
its Hugging Face name; a tensor is dequantized by the `gguf` package and put
back into the Hugging Face layout only when the converter takes it.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from coreinfer_jax.checkpoint.architectures import gguf_architecture
from coreinfer_jax.checkpoint.convert import TensorGetter


def read_gguf(path: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  from gguf import GGUFReader
  reader = GGUFReader(path)
  arch = _field(reader, "general.architecture")
  module = gguf_architecture(arch)
  config = module.hf_config_from_gguf(arch, functools.partial(_field, reader),
                                      {t.name for t in reader.tensors})
  tensors = {module.hf_name_from_gguf(t.name): functools.partial(_read, t, module, config)
             for t in reader.tensors}
  return config, tensors


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _read(tensor, module: types.ModuleType, hf_config: Mapping[str, Any]) -> np.ndarray:
  from gguf import quants
  array = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
  array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
  return module.to_hf_layout(tensor.name, array, hf_config)
