"""Text datasets for clustering and analysis: named datasets and plain files.

A `TextSet` holds each example's `text` (what clustering runs the model on),
its `prompt` (what a user would type at run time: for TruthfulQA the question
alone) and an optional `label` (a semantic group, e.g. TruthfulQA's category).
Paths always come from the caller (`data_dir`, a file path): nothing here knows
where the project's data lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from coreinfer_jax import files

TRUTHFULQA_FILE = os.path.join("truthfulqa", "TruthfulQA.csv")
DATASETS = ("truthfulqa",)


@dataclasses.dataclass(frozen=True)
class TextSet:
  name: str
  source: str                           # the file read
  texts: Tuple[str, ...]
  prompts: Tuple[str, ...]
  labels: Optional[Tuple[str, ...]]     # semantic group of each example, if known

  def __len__(self) -> int:
    return len(self.texts)

  def subset(self, indices: Sequence[int]) -> "TextSet":
    pick = lambda xs: tuple(xs[i] for i in indices)  # noqa: E731
    return dataclasses.replace(self, texts=pick(self.texts), prompts=pick(self.prompts),
                               labels=None if self.labels is None else pick(self.labels))

  def data_hash(self) -> str:
    """sha256 of the texts in order: artefacts name the exact data they came from."""
    digest = hashlib.sha256()
    for text in self.texts:
      digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def truthfulqa_rows(data_dir: str) -> Tuple[str, List[Dict[str, str]]]:
  """(the file read, its rows): TruthfulQA.csv under `data_dir`."""
  path = os.path.join(data_dir, TRUTHFULQA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TruthfulQA not found: {path} (give --data_dir, the folder that "
                            f"holds {TRUTHFULQA_FILE})")
  return path, files.read_csv(path)


def _truthfulqa(data_dir: str) -> TextSet:
  path, rows = truthfulqa_rows(data_dir)
  return TextSet("truthfulqa", path,
                 texts=tuple(f"{r['Question']} {r['Best Answer']}" for r in rows),
                 prompts=tuple(r["Question"] for r in rows),
                 labels=tuple(r["Category"] for r in rows))


def _file_rows(path: str, text_key: str, label_key: Optional[str]):
  if path.endswith(".txt"):
    return [(line, None) for line in files.read_lines(path) if line.strip()]
  if path.endswith(".jsonl"):
    records = files.read_jsonl(path)
  elif path.endswith(".csv"):
    records = files.read_csv(path)
  else:
    raise ValueError(f"{path}: expected a .txt (one text per line), .jsonl or .csv file")
  _check_fields(path, records, [key for key in (text_key, label_key) if key])
  return [(str(r[text_key]), None if not label_key else str(r[label_key])) for r in records]


def _check_fields(path: str, records: list, keys: Sequence[str]) -> None:
  """Every record is an object holding every key (one that lacks one would
  otherwise fail later as a bare KeyError naming no file)."""
  for number, record in enumerate(records, 1):
    if not isinstance(record, dict):
      raise files.InputFileError(f"{path}: record {number} is a {type(record).__name__}, "
                                 f"expected a JSON object")
    missing = [key for key in keys if key not in record]
    if missing:
      raise files.InputFileError(f"{path}: record {number} has no field {missing[0]!r} "
                                 f"(fields: {list(record)})")


def load_texts(dataset: str, data_dir: Optional[str] = None, *, text_key: str = "text",
               label_key: Optional[str] = None, limit: Optional[int] = None) -> TextSet:
  """A named dataset (`truthfulqa`, read from `data_dir`) or a file path: `.txt`
  (one text per line), `.jsonl` (field `text_key`) or `.csv` (column `text_key`),
  with `label_key` naming an optional group field. The first `limit` examples."""
  if dataset in DATASETS:
    if not data_dir:
      raise ValueError(f"dataset {dataset!r} needs --data_dir")
    texts = _truthfulqa(data_dir)
  elif os.path.isfile(dataset):
    rows = _file_rows(dataset, text_key, label_key)
    texts = TextSet(os.path.splitext(os.path.basename(dataset))[0], dataset,
                    texts=tuple(t for t, _ in rows), prompts=tuple(t for t, _ in rows),
                    labels=tuple(lab for _, lab in rows) if label_key else None)
  else:
    raise FileNotFoundError(f"dataset {dataset!r} is neither one of {', '.join(DATASETS)} "
                            f"nor an existing file")
  if limit is not None:
    if limit < 1:
      raise ValueError(f"--limit must be at least 1, got {limit}")
    texts = texts.subset(range(min(limit, len(texts))))
  if not len(texts):
    raise ValueError(f"dataset {dataset!r} holds no texts")
  return texts


def split_indices(num_texts: int, holdout_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """(kept, held out) example indices, each sorted: a seeded random split."""
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
  order = np.random.default_rng(seed).permutation(num_texts)
  held = int(round(holdout_fraction * num_texts))
  return np.sort(order[held:]), np.sort(order[:held])
