"""Every damaged input file is refused in one line that names the file and
the cause: a checkpoint's cut tensor (its bytes present and expected) or its
broken header, a JSON file's line and column, a text file's first byte that
is not UTF-8, a data file's bad line. The command line prints that line as
`error: ...` and exits 2, with no traceback."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from coreinfer_jax import checkpoint, files
from coreinfer_jax.checkpoint import CheckpointError
from coreinfer_jax.core import artefacts
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.eval import datasets, tasks
from tests.checkpoint.test_gguf_reader import one_tensor_gguf, truncated_gguf
from tests.conftest import REPO, run_generate

EMBED = "model.embed_tokens.weight"
EMBED_BYTES = 64 * 32 * 4           # the float32 [64, 32] tensor of both tiny files below
GGUF_ADVICE = "re-download or re-assemble it"
SAFETENSORS_ADVICE = "re-download or re-save it"
# Line 3, column 3 is not JSON.
BAD_JSON = '{\n  "a": 1,\n  oops\n}\n'
BAD_JSON_CAUSE = "invalid JSON at line 3 column 3: Expecting property name enclosed in double quotes"
NOT_UTF8 = b"first line\nsecond \xff line\n"   # byte 18 is not UTF-8
NOT_UTF8_CAUSE = "not UTF-8 text (byte 18: b'\\xff')"


# Checkpoints: each builder damages a file and returns (the path given to
# load_config, the message expected).

def gguf_cut_in_tensor(tmp_path, tiny_llama):
  path = tmp_path / "model.gguf"
  size = truncated_gguf(path)        # half its bytes; its one tensor ends the file
  cut, start = size // 2, size - EMBED_BYTES
  return path, (f"GGUF file '{path}' is truncated: {cut} bytes, its tensors need {size} (tensor "
                f"'token_embd.weight' has {cut - start} of its {EMBED_BYTES} bytes; {GGUF_ADVICE})")


def gguf_cut_in_header(kind, name):
  """The GGUF cut 2 bytes after the metadata key or tensor `name` in its
  header: inside that entry's type or dimension count."""
  def build(tmp_path, tiny_llama):
    path = tmp_path / "model.gguf"
    one_tensor_gguf(path)
    data = path.read_bytes()
    cut = data.index(name.encode()) + len(name) + 2
    path.write_bytes(data[:cut])
    return path, (f"GGUF file '{path}' is truncated or corrupt: the file ends inside its header, "
                  f"in {kind} {name!r} ({cut} bytes; {GGUF_ADVICE})")
  return build


def gguf_garbage_tensor_count(tmp_path, tiny_llama):
  path = tmp_path / "model.gguf"
  one_tensor_gguf(path)
  data = bytearray(path.read_bytes())
  data[8:16] = (2 ** 40).to_bytes(8, "little")   # after the magic and the version
  path.write_bytes(data)
  return path, (f"GGUF file '{path}' is truncated or corrupt: the header's counts: {2 ** 40} "
                f"tensors cannot fit in the file ({len(data)} bytes; {GGUF_ADVICE})")


def safetensors_folder(tmp_path, tiny_llama):
  """A folder of the tiny Llama's config.json and one float32 [64, 32] tensor:
  (folder, the safetensors file, its bytes, the end of its header)."""
  folder = tmp_path / "folder"
  folder.mkdir()
  shutil.copy(os.path.join(tiny_llama, "config.json"), folder)
  path = folder / "model.safetensors"
  save_file({EMBED: np.ones((64, 32), np.float32)}, str(path))
  data = path.read_bytes()
  return folder, path, data, 8 + int.from_bytes(data[:8], "little")


def safetensors_cut_in_tensor(tmp_path, tiny_llama):
  folder, path, data, header_end = safetensors_folder(tmp_path, tiny_llama)
  path.write_bytes(data[:header_end + 100])
  return folder, (f"safetensors file '{path}' is truncated: {header_end + 100} bytes, its tensors "
                  f"need {len(data)} (tensor '{EMBED}' has 100 of its {EMBED_BYTES} bytes; "
                  f"{SAFETENSORS_ADVICE})")


def safetensors_header_not_json(tmp_path, tiny_llama):
  folder, path, data, header_end = safetensors_folder(tmp_path, tiny_llama)
  path.write_bytes(data[:8] + b"{" + b"x" * (header_end - 9) + data[header_end:])
  return folder, (f"safetensors file '{path}' is truncated or corrupt: its header is not valid "
                  f"JSON at line 1 column 2: Expecting property name enclosed in double quotes "
                  f"({SAFETENSORS_ADVICE})")


def safetensors_shape_unlike_bytes(tmp_path, tiny_llama):
  folder, path, data, header_end = safetensors_folder(tmp_path, tiny_llama)
  path.write_bytes(data.replace(b"[64,32]", b"[64,16]"))
  return folder, (f"safetensors file '{path}' is truncated or corrupt: tensor '{EMBED}': "
                  f"data_offsets [0, {EMBED_BYTES}] hold {EMBED_BYTES} bytes, its shape [64, 16] "
                  f"of F32 needs {EMBED_BYTES // 2} ({SAFETENSORS_ADVICE})")


@pytest.mark.parametrize("damage", [
    gguf_cut_in_tensor, gguf_cut_in_header("metadata", "general.architecture"),
    gguf_cut_in_header("tensor", "token_embd.weight"), gguf_garbage_tensor_count,
    safetensors_cut_in_tensor, safetensors_header_not_json, safetensors_shape_unlike_bytes,
], ids=["gguf_cut_in_tensor", "gguf_cut_in_metadata", "gguf_cut_in_tensor_entry",
        "gguf_garbage_tensor_count", "safetensors_cut_in_tensor", "safetensors_header_not_json",
        "safetensors_shape_unlike_bytes"])
def test_damaged_checkpoint_is_one_line_naming_file_and_cause(damage, tmp_path, tiny_llama):
  path, message = damage(tmp_path, tiny_llama)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_config(str(path))
  assert str(e.value) == message


# JSON files: each reader is given BAD_JSON as the named file.

def config_json(tmp_path):
  (tmp_path / "config.json").write_text(BAD_JSON)
  return tmp_path / "config.json", lambda: checkpoint.load_config(str(tmp_path))


def tokenizer_json(tmp_path):
  folder = shutil.copytree(os.path.join(REPO, "tests", "fixtures", "tokenizer"), tmp_path / "tok")
  (folder / "tokenizer.json").write_text(BAD_JSON)
  return folder / "tokenizer.json", lambda: checkpoint.load_tokenizer(str(folder))


def beta_file(tmp_path):
  (tmp_path / "beta.json").write_text(BAD_JSON)
  return tmp_path / "beta.json", lambda: core_spec(3, 96, beta_file=str(tmp_path / "beta.json"))


def cluster_manifest(tmp_path):
  (tmp_path / artefacts.MANIFEST).write_text(BAD_JSON)
  return tmp_path / artefacts.MANIFEST, lambda: artefacts.read_manifest(str(tmp_path))


@pytest.mark.parametrize("damage", [config_json, tokenizer_json, beta_file, cluster_manifest],
                         ids=lambda damage: damage.__name__)
def test_malformed_json_file_names_line_and_column(damage, tmp_path):
  path, read = damage(tmp_path)
  with pytest.raises(files.InputFileError) as e:
    read()
  assert str(e.value) == f"{path}: {BAD_JSON_CAUSE}"


# Data files (datasets, task files): (file name, its bytes, how it is read, the cause expected).

def data_dir_task(name):
  return lambda data_dir: tasks.load_examples(tasks.get_task(name), str(data_dir))


@pytest.mark.parametrize("relative, content, read, cause", [
    ("texts.txt", NOT_UTF8, lambda p: datasets.load_texts(str(p)), NOT_UTF8_CAUSE),
    ("texts.csv", b"text\n" + NOT_UTF8, lambda p: datasets.load_texts(str(p)),
     "not UTF-8 text (byte 23: b'\\xff')"),
    ("texts.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n',
     lambda p: datasets.load_texts(str(p)), "invalid JSON at line 4 column 10: Expecting value"),
    ("texts.jsonl", b'{"text": "a"}\n["b"]\n', lambda p: datasets.load_texts(str(p)),
     "record 2 is a list, expected a JSON object"),
    ("texts.jsonl", b'{"text": "a"}\n{"body": "b"}\n', lambda p: datasets.load_texts(str(p)),
     "record 2 has no field 'text' (fields: ['body'])"),
    ("wikitext2_raw/wiki.test.raw", NOT_UTF8, lambda p: tasks.wikitext_text(str(p.parents[1])),
     NOT_UTF8_CAUSE),
    ("hellaswag/hellaswag_val_full.txt.bz2", NOT_UTF8,
     lambda p: data_dir_task("hellaswag")(p.parents[1]), "not bz2-compressed data (Invalid data stream)"),
    ("piqa/valid-labels.lst", b"0\nx\n", lambda p: data_dir_task("piqa")(p.parents[1]),
     "line 2 is 'x', not an integer label"),
], ids=["txt_not_utf8", "csv_not_utf8", "jsonl_bad_line", "jsonl_not_object", "jsonl_no_field",
        "wikitext_not_utf8", "hellaswag_not_bz2", "piqa_bad_label"])
def test_damaged_data_file_names_where(relative, content, read, cause, tmp_path):
  path = tmp_path / relative
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  (tmp_path / "piqa").mkdir(exist_ok=True)
  (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
  with pytest.raises(files.InputFileError) as e:
    read(path)
  assert str(e.value) == f"{path}: {cause}"


# The command line: the same lines, printed once, exit status 2.

def prompts_not_utf8(tmp_path, tiny_llama_with_tokenizer):
  path = tmp_path / "prompts.txt"
  path.write_bytes(NOT_UTF8)
  return [f"--model={tiny_llama_with_tokenizer}", f"--prompts_file={path}"], f"{path}: {NOT_UTF8_CAUSE}"


def safetensors_cut(tmp_path, tiny_llama_with_tokenizer):
  folder, message = safetensors_cut_in_tensor(tmp_path, tiny_llama_with_tokenizer)
  return [f"--model={folder}", "--prompt=hi"], message


def gguf_header_cut(tmp_path, tiny_llama_with_tokenizer):
  path, message = gguf_cut_in_header("tensor", "token_embd.weight")(tmp_path, None)
  return [f"--model={path}", "--prompt=hi"], message


@pytest.mark.parametrize("damage", [prompts_not_utf8, safetensors_cut, gguf_header_cut],
                         ids=lambda damage: damage.__name__)
def test_command_line_prints_the_one_line_and_exits_2(damage, tmp_path, tiny_llama_with_tokenizer,
                                                      monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  args, message = damage(tmp_path, tiny_llama_with_tokenizer)
  proc = run_generate(*args)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == f"error: {message}\n"
