"""Checkpoints -> `ModelConfig` and `ModelParams`.

One module per architecture (`llama`, `opt`), registered by model type in
`architectures`; a reader per file format (`safetensors_reader`,
`gguf_reader`); strict conversion (`convert`) and loading (`load`). This
package re-exports the public API.
"""

from coreinfer_jax.checkpoint.architectures import config_from_hf
from coreinfer_jax.checkpoint.convert import params_from_hf_tensors, random_params
from coreinfer_jax.checkpoint.errors import CheckpointError, UnsupportedConfigError
from coreinfer_jax.checkpoint.load import (LoadedModel, default_model_path, fingerprint,
                                           load_config, load_model)

__all__ = ["CheckpointError", "LoadedModel", "UnsupportedConfigError", "config_from_hf",
           "default_model_path", "fingerprint", "load_config", "load_model",
           "params_from_hf_tensors", "random_params"]
