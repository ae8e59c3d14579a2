"""Datasets of the local lm-eval tasks, read from `data_dir` (pass it with
`--metadata '{"data_dir": "..."}'` or `TaskManager(metadata=...)`)."""

import datasets

from coreinfer_jax.eval import metrics, tasks


def _data_dir(kwargs) -> str:
  if not kwargs.get("data_dir"):
    raise ValueError("these tasks read local files: pass metadata {\"data_dir\": ...}")
  return kwargs["data_dir"]


def _choices(name: str, **kwargs):
  examples = tasks.load_examples(tasks.get_task(name), _data_dir(kwargs))
  return {"validation": datasets.Dataset.from_list(
      [{"context": e.context, "choices": list(e.choices), "gold": e.gold} for e in examples])}


def piqa(**kwargs):
  return _choices("piqa", **kwargs)


def arc_easy(**kwargs):
  return _choices("arc_easy", **kwargs)


def arc_challenge(**kwargs):
  return _choices("arc_challenge", **kwargs)


def hellaswag(**kwargs):
  return _choices("hellaswag", **kwargs)


def wikitext(**kwargs):
  """WikiText-2 raw test as one document per article (lines `= Title =`)."""
  articles, current = [], []
  for line in tasks.wikitext_text(_data_dir(kwargs)).split("\n"):
    if line.startswith(" = ") and not line.startswith(" = = ") and current:
      articles.append("\n".join(current))
      current = []
    current.append(line)
  articles.append("\n".join(current))
  return {"test": datasets.Dataset.from_list([{"page": a} for a in articles if a.strip()])}


def truthfulqa_gen(**kwargs):
  examples = tasks.load_examples(tasks.get_task("truthfulqa_gen"), _data_dir(kwargs))
  return {"validation": datasets.Dataset.from_list(
      [{"prompt": e.prompt, "correct_answers": list(e.references),
        "incorrect_answers": list(e.incorrect)} for e in examples])}


def truthfulqa_results(doc, results):
  return metrics.truthfulqa(results[0], doc["correct_answers"], doc["incorrect_answers"])
