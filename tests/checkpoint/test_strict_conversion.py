"""Strict conversion: unsupported configs, tensors and files fail early, naming the problem."""

import os
import shutil

import numpy as np
import pytest

from coreinfer_jax.checkpoint import CheckpointError, UnsupportedConfigError, config_from_hf
from coreinfer_jax.checkpoint import load as loading

LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"some_new_attention_trick": 1}, "some_new_attention_trick"),
])
def test_unsupported_config_names_the_field(change, field):
  with pytest.raises(UnsupportedConfigError, match=field):
    config_from_hf(dict(LLAMA, **change))


def test_opt_without_relu_is_refused():
  with pytest.raises(UnsupportedConfigError, match="activation_function"):
    config_from_hf({"model_type": "opt", "vocab_size": 8, "hidden_size": 8, "ffn_dim": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "activation_function": "gelu"})


def _edit_checkpoint(src, dst, edit):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(dst, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return dst


def test_missing_unexpected_and_misshaped_tensors(tiny_llama, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  missing = _edit_checkpoint(tiny_llama, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
    loading.load_model(str(missing), with_tokenizer=False)
  extra = _edit_checkpoint(tiny_llama, tmp_path / "extra",
                           lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", t[name]))
  with pytest.raises(CheckpointError, match="unexpected tensor"):
    loading.load_model(str(extra), with_tokenizer=False)
  bad = _edit_checkpoint(tiny_llama, tmp_path / "bad", lambda t: t.__setitem__(name, t[name][:, :10]))
  with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
    loading.load_model(str(bad), with_tokenizer=False)


def test_gguf_of_unsupported_architecture(tmp_path):
  import gguf
  path = str(tmp_path / "tiny-gpt2.gguf")
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UnsupportedConfigError, match="GGUF architecture 'gpt2'"):
    loading.load_model(path, with_tokenizer=False)


def test_missing_model_path():
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.load_model("/no/such/model", with_tokenizer=False)
