"""GGUF files that are truncated or no GGUF at all are refused in one line,
naming the file, before any tensor is read."""

import os

import gguf
import numpy as np
import pytest

from coreinfer_jax.checkpoint import CheckpointError
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.checkpoint.gguf_reader import read_gguf


def one_tensor_gguf(path, arch="llama"):
  """A GGUF of architecture `arch` with one float32 tensor."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def truncated_gguf(path, keep=0.5):
  """`one_tensor_gguf`, cut to `keep` of its bytes."""
  one_tensor_gguf(path)
  size = os.path.getsize(path)
  os.truncate(path, int(size * keep))
  return size


def test_truncated_gguf_names_the_file_both_sizes_and_the_cut_tensor(tmp_path):
  path = tmp_path / "model.gguf"
  size = truncated_gguf(path)
  with pytest.raises(CheckpointError) as e:
    read_gguf(str(path))
  start = size - 64 * 32 * 4   # its one float32 tensor ends the file
  assert str(e.value) == (f"GGUF file '{path}' is truncated: {size // 2} bytes, its tensors need "
                          f"{size} (tensor 'token_embd.weight' has {size // 2 - start} of its "
                          f"{64 * 32 * 4} bytes; re-download or re-assemble it)")


def test_not_a_gguf_file_is_one_line(tmp_path):
  path = tmp_path / "model.gguf"
  path.write_text("not a GGUF file at all")
  with pytest.raises(CheckpointError, match=r"^GGUF file '.*model.gguf' is not a valid GGUF file: "
                                            r"GGUF magic invalid \(22 bytes;"):
    read_gguf(str(path))


def test_gguf_cut_inside_its_header_is_one_line(tmp_path):
  path = tmp_path / "model.gguf"
  truncated_gguf(path, keep=0.01)
  with pytest.raises(CheckpointError, match="is truncated or corrupt") as e:
    read_gguf(str(path))
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_real_model_cut_in_half_is_truncated(tmp_path):
  source = loading.default_model_path()
  path = tmp_path / "half.gguf"
  with open(source, "rb") as src, open(path, "wb") as dst:
    dst.write(src.read(os.path.getsize(source) // 2))
  with pytest.raises(CheckpointError, match=f"is truncated: {os.path.getsize(path)} bytes, its "
                                            f"tensors need {os.path.getsize(source)}"):
    loading.load_config(str(path))
