"""Loading checkpoints: Hugging Face folders (safetensors) and GGUF files.

A reader (`safetensors_reader`, `gguf_reader`) reduces the path, read once,
to (Hugging Face-style config dict, Hugging Face-named lazy tensors), which
`architectures.config_from_hf` and `convert.params_from_hf_tensors` turn
into a `ModelConfig` and `ModelParams`. The tokenizer comes from
`tokenizer.json` (folders) or is rebuilt from the GGUF metadata by
transformers. A model is a path or a name of `named.NAMED_MODELS` (None:
the default named model), turned into a path by `named.model_path`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from coreinfer_jax import files
from coreinfer_jax.checkpoint import cache, named
from coreinfer_jax.checkpoint.architectures import config_from_hf
from coreinfer_jax.checkpoint.convert import TensorGetter, params_from_hf_tensors
from coreinfer_jax.checkpoint.gguf_reader import read_gguf
from coreinfer_jax.checkpoint.safetensors_reader import read_folder
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams

# The JSON files transformers reads to build a folder's tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "config.json")


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  params: ModelParams
  tokenizer: Any          # a transformers tokenizer
  path: str
  fingerprint: str        # identifies the checkpoint's bytes (size + sampled hash)


def default_model_path() -> str:
  """The default named model's verified GGUF (`named.DEFAULT_MODEL`)."""
  return named.model_path(None)


def fingerprint(path: str) -> str:
  """A cheap identity for a checkpoint: file names, sizes and the first MiB of each."""
  files = ([path] if os.path.isfile(path) else
           sorted(glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, "config.json")]))
  digest = hashlib.sha256()
  for f in files:
    digest.update(os.path.basename(f).encode())
    digest.update(str(os.path.getsize(f)).encode())
    with open(f, "rb") as fh:
      digest.update(fh.read(1 << 20))
  return digest.hexdigest()[:16]


def load_hf_config_and_tensors(path: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"model path {path!r} does not exist")
  if os.path.isdir(path):
    return read_folder(path)
  if path.endswith(".gguf"):
    return read_gguf(path)
  raise ValueError(f"model path {path!r} is neither a Hugging Face folder nor a .gguf file")


def load_tokenizer(path: str, cache_dir: Optional[str] = None):
  """From a folder's tokenizer files, or rebuilt from GGUF metadata. The GGUF
  rebuild takes seconds, so its result is kept under `cache_dir` (default
  the tokenizers cache), keyed by the file's fingerprint."""
  from transformers import AutoTokenizer
  if os.path.isdir(path):
    return _folder_tokenizer(path)
  cached = os.path.join(cache_dir or cache.cache_dir("tokenizers"), fingerprint(path))
  if os.path.isfile(os.path.join(cached, "tokenizer.json")):
    return AutoTokenizer.from_pretrained(cached)
  tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
  try:
    tmp = f"{cached}.tmp{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cached)
  except OSError:
    pass   # a read-only cache only costs time
  return tokenizer


def _folder_tokenizer(folder: str):
  """The folder's tokenizer. transformers reports a damaged JSON file by the
  decoder's bare message ("Expecting value: line 1 column 7"), naming no
  file; when it fails, its files are read again only to raise
  `files.InputFileError` naming the one that is not JSON."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(folder)
  except Exception:
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(folder, name)):
        files.read_json(os.path.join(folder, name))
    raise


def load_config(model: Optional[str] = None) -> ModelConfig:
  """The model's config alone (tensors are not read): to check settings early."""
  return config_from_hf(load_hf_config_and_tensors(named.model_path(model))[0])


def load_model(model: Optional[str] = None, dtype: Any = np.float32,
               with_tokenizer: bool = True) -> LoadedModel:
  """Loads a checkpoint folder, a GGUF file or a named model (default: `named.DEFAULT_MODEL`)."""
  path = named.model_path(model)
  hf_config, tensors = load_hf_config_and_tensors(path)
  config = config_from_hf(hf_config)
  params = params_from_hf_tensors(config, tensors, dtype)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path,
                     fingerprint=fingerprint(path))
