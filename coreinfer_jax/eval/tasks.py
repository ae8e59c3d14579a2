"""Evaluation tasks read from local files, with lm-eval's prompt formats.

Three kinds: `perplexity` (WikiText-2 raw test, in token windows),
`multiple_choice` (PIQA, ARC-Easy/Challenge, HellaSwag: a context and its
choices, the gold index) and `generation` (TruthfulQA, SQuAD v1.1, XSum,
WMT22 de-en: a prompt and its references). Examples are taken in file order;
`limit` keeps the first N. Few-shot examples come from the end of the file and
are never evaluated.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import os
import re
from typing import List, Optional, Sequence, Tuple

from coreinfer_jax import files
from coreinfer_jax.eval.datasets import truthfulqa_rows

# lm-eval's truthfulqa_gen QA primer (6 shots).
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")

FEWSHOT_DELIMITER = "\n\n"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str                         # perplexity | multiple_choice | generation
  until: Tuple[str, ...] = ()       # generation: stop strings
  max_new_tokens: int = 0           # generation: token cap


TASKS = {t.name: t for t in (
    Task("wikitext", "perplexity"),
    Task("piqa", "multiple_choice"),
    Task("arc_easy", "multiple_choice"),
    Task("arc_challenge", "multiple_choice"),
    Task("hellaswag", "multiple_choice"),
    Task("truthfulqa_gen", "generation", until=("\n\n",), max_new_tokens=64),
    Task("squad", "generation", until=("\n",), max_new_tokens=32),
    Task("xsum", "generation", until=("\n",), max_new_tokens=64),
    Task("wmt22_de_en", "generation", until=("\n",), max_new_tokens=128),
)}


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
  context: str
  choices: Tuple[str, ...]          # each scored after the context (leading space included)
  gold: int


@dataclasses.dataclass(frozen=True)
class GenerationExample:
  prompt: str
  references: Tuple[str, ...]       # correct answers / reference texts
  incorrect: Tuple[str, ...] = ()   # TruthfulQA's incorrect answers


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
  return TASKS[name]


def _path(data_dir: str, *parts: str) -> str:
  path = os.path.join(data_dir, *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (is --data_dir the shared data folder?)")
  return path


def _read_labels(path: str) -> List[int]:
  """One integer label per line that is not blank."""
  labels = []
  for number, line in enumerate(files.read_lines(path), 1):
    if line.strip():
      try:
        labels.append(int(line))
      except ValueError:
        raise files.InputFileError(f"{path}: line {number} is {line!r}, not an integer label"
                                   ) from None
  return labels


def _read_bz2_text(path: str) -> str:
  """The decompressed text, line ends translated to \\n as text mode does."""
  with open(path, "rb") as fh:
    compressed = fh.read()
  try:
    data = bz2.decompress(compressed)
  except (OSError, ValueError) as e:
    raise files.InputFileError(f"{path}: not bz2-compressed data ({e})") from None
  return io.StringIO(files.decode_text(f"{path} (decompressed)", data), newline=None).read()


def _piqa(data_dir: str) -> List[ChoiceExample]:
  docs = files.read_jsonl(_path(data_dir, "piqa", "valid.jsonl"))
  labels = _read_labels(_path(data_dir, "piqa", "valid-labels.lst"))
  return [ChoiceExample(f"Question: {d['goal']}\nAnswer:", (" " + d["sol1"], " " + d["sol2"]), y)
          for d, y in zip(docs, labels)]


def _arc(data_dir: str, subset: str) -> List[ChoiceExample]:
  out = []
  for d in files.read_jsonl(_path(data_dir, "arc", f"ARC-{subset}-Test.jsonl")):
    choices = d["question"]["choices"]
    labels = [c["label"] for c in choices]
    out.append(ChoiceExample(f"Question: {d['question']['stem']}\nAnswer:",
                             tuple(" " + c["text"] for c in choices), labels.index(d["answerKey"])))
  return out


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's hellaswag cleaning of WikiHow artefacts."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(data_dir: str) -> List[ChoiceExample]:
  lines = _read_bz2_text(_path(data_dir, "hellaswag", "hellaswag_val_full.txt.bz2")).split("\n")
  out = []
  for i in range(0, len(lines) - 5, 6):   # 6 lines per example: context, label, 4 endings
    context, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
    out.append(ChoiceExample(hellaswag_preprocess(context),
                             tuple(" " + hellaswag_preprocess(e) for e in endings), int(label)))
  return out


def truthfulqa_answers(text: str) -> List[str]:
  """A `;`-separated answer field of TruthfulQA.csv as a list."""
  return [a.strip() for a in text.split(";") if a.strip()]


def _truthfulqa(data_dir: str) -> List[GenerationExample]:
  _, rows = truthfulqa_rows(data_dir)
  return [GenerationExample(TRUTHFULQA_PRIMER + "\n\nQ: " + r["Question"].strip(),
                            tuple(truthfulqa_answers(r["Correct Answers"])),
                            tuple(truthfulqa_answers(r["Incorrect Answers"]))) for r in rows]


def _squad(data_dir: str) -> List[GenerationExample]:
  articles = files.read_json(_path(data_dir, "squad_v1.1_dev", "dev-v1.1.rebuilt.json"))["data"]
  out = []
  for article in articles:
    title = article["title"].replace("_", " ")
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        prompt = (f"Title: {title}\n\nBackground: {paragraph['context']}\n\n"
                  f"Question: {qa['question']}\n\nAnswer:")
        out.append(GenerationExample(prompt, tuple(a["text"] for a in qa["answers"])))
  return out


XSUM_MAX_WORDS = 300   # article words kept, so prompt + summary fit a 1024-token cache


def _xsum(data_dir: str) -> List[GenerationExample]:
  out = []
  for d in files.read_jsonl(_path(data_dir, "xsum", "xsum_test_1000.jsonl")):
    article = " ".join(d["document"].split()[:XSUM_MAX_WORDS])
    out.append(GenerationExample(f"Article: {article}\n\nOne-sentence summary:", (d["summary"],)))
  return out


def _wmt22(data_dir: str) -> List[GenerationExample]:
  sources = files.read_text(_path(data_dir, "wmt22_de_en", "generaltest2022.de-en.src.de")).splitlines()
  references = files.read_text(_path(data_dir, "wmt22_de_en", "generaltest2022.de-en.ref.A.en")
                               ).splitlines()
  if len(sources) != len(references):
    raise ValueError(f"wmt22_de_en: {len(sources)} sources but {len(references)} references")
  return [GenerationExample(f"German: {s}\nEnglish:", (r,)) for s, r in zip(sources, references)
          if s.strip()]


_LOADERS = {
    "piqa": _piqa,
    "arc_easy": lambda d: _arc(d, "Easy"),
    "arc_challenge": lambda d: _arc(d, "Challenge"),
    "hellaswag": _hellaswag,
    "truthfulqa_gen": _truthfulqa,
    "squad": _squad,
    "xsum": _xsum,
    "wmt22_de_en": _wmt22,
}


def _with_fewshot(examples: list, num_fewshot: int) -> list:
  """Prefixes each prompt with the last `num_fewshot` examples (answered),
  which are then left out of evaluation."""
  if num_fewshot <= 0:
    return examples
  if num_fewshot >= len(examples):
    raise ValueError(f"num_fewshot={num_fewshot} leaves no example to evaluate")
  shots, examples = examples[-num_fewshot:], examples[:-num_fewshot]

  def answered(e):
    if isinstance(e, ChoiceExample):
      return e.context + e.choices[e.gold]
    return e.prompt + " " + e.references[0]
  primer = FEWSHOT_DELIMITER.join(answered(e) for e in shots) + FEWSHOT_DELIMITER
  return [dataclasses.replace(e, context=primer + e.context) if isinstance(e, ChoiceExample)
          else dataclasses.replace(e, prompt=primer + e.prompt) for e in examples]


def load_examples(task: Task, data_dir: str, limit: Optional[int] = None, num_fewshot: int = 0):
  """A choice or generation task's examples, the first `limit` (after few-shot)."""
  if task.kind == "perplexity":
    raise ValueError(f"{task.name} is read with wikitext_text and split into windows")
  if task.name == "truthfulqa_gen" and num_fewshot:
    raise ValueError("truthfulqa_gen has its own fixed 6-shot QA primer; use --num_fewshot=0")
  examples = _with_fewshot(_LOADERS[task.name](data_dir), num_fewshot)
  return examples[:limit] if limit else examples


def wikitext_text(data_dir: str) -> str:
  """WikiText-2 raw test, as one document (lm-eval's `wikitext` reads the same split)."""
  return files.read_text(_path(data_dir, "wikitext2_raw", "wiki.test.raw")).replace("\r\n", "\n")


@dataclasses.dataclass(frozen=True)
class Window:
  context: Tuple[int, ...]         # prefilled densely: chooses the core neurons
  continuation: Tuple[int, ...]    # scored as decoding would


def special_prefix(tokenizer) -> Tuple[int, ...]:
  """The tokens the tokenizer puts before any text (Gemma's BOS; none for
  SmolLM2 or Qwen)."""
  with_special = list(tokenizer("a")["input_ids"])
  without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
  cut = len(with_special) - len(without)
  return tuple(with_special[:cut]) if cut > 0 and with_special[cut:] == without else ()


def text_windows(tokenizer, text: str, context_len: int, continuation_len: int,
                 count: Optional[int] = None, skip: int = 0) -> List[Window]:
  """`token_windows` of a text, each context starting with the tokenizer's
  special prefix as a document would (a model trained with a BOS scores text
  far worse without one)."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  return token_windows(ids, context_len, continuation_len, count, skip, special_prefix(tokenizer))


def token_windows(token_ids: Sequence[int], context_len: int, continuation_len: int,
                  count: Optional[int] = None, skip: int = 0,
                  prefix: Sequence[int] = ()) -> List[Window]:
  """Consecutive non-overlapping windows of `context_len + continuation_len`
  tokens, from window number `skip` on, at most `count` of them; a `prefix`
  replaces the first tokens of each context (so windows lie where they would
  without it)."""
  if context_len <= len(prefix) or continuation_len < 1:
    raise ValueError("window context (beyond any BOS) and continuation lengths must be at least 1")
  size = context_len + continuation_len
  available = len(token_ids) // size - skip
  if available < (count or 1):
    raise ValueError(f"text of {len(token_ids)} tokens holds {max(available, 0)} windows of "
                     f"{size} tokens after skipping {skip}; asked for {count or 1}")
  n = available if count is None else count
  return [Window(tuple(prefix) + tuple(token_ids[i * size + len(prefix):i * size + context_len]),
                 tuple(token_ids[i * size + context_len:(i + 1) * size]))
          for i in range(skip, skip + n)]
