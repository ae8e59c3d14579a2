"""The registry of architectures: Hugging Face `model_type` (or GGUF
`general.architecture`) -> the module that converts it, and the strict
conversion of a Hugging Face config.

Every architecture module has the same interface: `MODEL_TYPES`,
`KNOWN_FIELDS` (the config fields it reads or checks), `config_from_hf(cfg)`,
`params(take, config)` and `GGUF_ARCHITECTURES`; a module with GGUF
architectures also has `hf_config_from_gguf`, `hf_name_from_gguf` and
`to_hf_layout` (see `llama`).
"""

from __future__ import annotations

import types
from typing import Any, Mapping, Sequence

from coreinfer_jax.checkpoint import gemma3, llama, opt
from coreinfer_jax.checkpoint.errors import UnsupportedConfigError
from coreinfer_jax.model.config import ModelConfig

_MODULES = (llama, gemma3, opt)
_BY_MODEL_TYPE = {t: m for m in _MODULES for t in m.MODEL_TYPES}
_BY_GGUF_ARCHITECTURE = {a: m for m in _MODULES for a in m.GGUF_ARCHITECTURES}
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)
SUPPORTED_GGUF_ARCHITECTURES = tuple(_BY_GGUF_ARCHITECTURE)

# Fields that change no arithmetic of inference (training, bookkeeping, tokens).
NEUTRAL_FIELDS = frozenset("""
  architectures model_type transformers_version torch_dtype dtype _name_or_path
  use_cache initializer_range init_std attention_dropout dropout layerdrop
  pad_token_id output_attentions output_hidden_states return_dict
  id2label label2id problem_type is_encoder_decoder chunk_size_feed_forward
  pretraining_tp tie_encoder_decoder _attn_implementation_autoset
  tokenizer_class prefix bos_token_id eos_token_id
  torchscript keys_to_ignore_at_inference add_cross_attention cross_attention_hidden_size
  finetuning_task task_specific_params tf_legacy_loss use_bfloat16 chunk_size
  sep_token_id decoder_start_token_id temperature top_p top_k
  quantization_config _commit_hash base_model_tp_plan base_model_pp_plan
""".split())
# A field that any architecture knows is accepted for every model type, as
# before the architectures had modules of their own: configs carry shared
# fields their architecture ignores (the test OPT configs have
# `intermediate_size` and `num_key_value_heads`).
_KNOWN_FIELDS = NEUTRAL_FIELDS.union(*(m.KNOWN_FIELDS for m in _MODULES))


def _lookup(table: Mapping[Any, types.ModuleType], key: Any, what: str,
            supported: Sequence[str]) -> types.ModuleType:
  if key not in table:
    raise UnsupportedConfigError(f"{what} {key!r} is not supported "
                                 f"(supported: {', '.join(supported)})")
  return table[key]


def architecture(model_type: Any) -> types.ModuleType:
  """The module that converts checkpoints of `model_type`."""
  return _lookup(_BY_MODEL_TYPE, model_type, "config field 'model_type' =", SUPPORTED_MODEL_TYPES)


def gguf_architecture(arch: Any) -> types.ModuleType:
  """The module that reads GGUF files of `general.architecture` = `arch`."""
  return _lookup(_BY_GGUF_ARCHITECTURE, arch, "GGUF architecture", SUPPORTED_GGUF_ARCHITECTURES)


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
  """Converts a Hugging Face `config.json` dict; refuses what it cannot run.

  Raises UnsupportedConfigError naming the field for an unsupported model type
  or setting, and for any field it does not know (a new field may change the
  arithmetic, so it is safer to stop than to run a different model).
  """
  module = architecture(cfg.get("model_type"))
  unknown = sorted(k for k in cfg if k not in _KNOWN_FIELDS)
  if unknown:
    raise UnsupportedConfigError(
        f"config field {unknown[0]!r} = {cfg[unknown[0]]!r} is not supported "
        f"(unknown fields: {', '.join(unknown)})")
  return module.config_from_hf(cfg)
