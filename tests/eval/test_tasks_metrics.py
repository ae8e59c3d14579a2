"""Task files read as lm-eval reads them; metrics equal their reference implementations."""

import os

import numpy as np
import pytest

from coreinfer_jax.eval import metrics
from coreinfer_jax.eval import tasks
from tests.conftest import REPO

DATA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason="../shared/data not present")


def test_squad_matches_the_official_script_semantics():
  # Normalisation drops case, punctuation, articles and extra spaces.
  assert metrics.squad("The  Denver Broncos!", ["Denver Broncos"]) == {"exact_match": 100.0, "f1": 100.0}
  got = metrics.squad("Denver Broncos team", ["Broncos", "Denver Broncos"])
  assert got["exact_match"] == 0.0
  assert got["f1"] == pytest.approx(100 * 2 * (2 / 3) * 1 / (2 / 3 + 1))   # best over answers
  assert metrics.squad("Carolina", ["Denver Broncos"])["f1"] == 0.0


def test_rouge_and_translation_equal_the_libraries():
  import sacrebleu
  from rouge_score import rouge_scorer
  preds = ["the cat sat on the mat", "a quick brown fox jumps"]
  refs = ["a cat was sitting on the mat", "the quick brown fox jumped over"]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
  got = metrics.rouge(preds, refs)
  for t in ("rouge1", "rouge2", "rougeLsum"):
    assert got[t] == pytest.approx(100 * np.mean([scorer.score(r, p)[t].fmeasure
                                                  for p, r in zip(preds, refs)]))
  assert got["rouge1"] > got["rouge2"] > 0
  got = metrics.translation(preds, refs)
  assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
  assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
  assert metrics.translation(refs, refs)["bleu"] == pytest.approx(100.0)


def test_truthfulqa_is_lm_evals_own_scoring():
  from lm_eval.tasks.truthfulqa import utils as tqa
  correct, incorrect = ["The sky is blue", "Blue"], ["The sky is green."]
  got = metrics.truthfulqa("\nA: The sky is blue.", correct, incorrect)
  doc = {"correct_answers": ["The sky is blue.", "Blue.", "I have no comment."],
         "incorrect_answers": ["The sky is green."]}
  assert got == pytest.approx(tqa.process_results_gen(doc, ["\nA: The sky is blue."]))
  assert got["bleu_acc"] == 1.0 and got["rouge1_acc"] == 1.0 and got["bleu_diff"] > 0


def test_multiple_choice_acc_norm_divides_by_characters():
  # Choice 1 has the higher total but the lower per-character log-likelihood.
  got = metrics.multiple_choice([-10.0, -6.0], [" a long answer here", " short"], gold=0)
  assert got == {"acc": 0.0, "acc_norm": 1.0}


def test_token_windows():
  windows = tasks.token_windows(list(range(100)), 10, 5, count=3, skip=1)
  assert [w.context[0] for w in windows] == [15, 30, 45]
  assert all(len(w.context) == 10 and len(w.continuation) == 5 for w in windows)
  assert windows[0].continuation == tuple(range(25, 30))
  with pytest.raises(ValueError, match="holds 5 windows"):
    tasks.token_windows(list(range(100)), 10, 5, count=7, skip=1)


class _WordTokenizer:
  """Words as ids (their length), with an optional BOS of id 99."""

  def __init__(self, bos):
    self.bos = bos

  def __call__(self, text, add_special_tokens=True):
    ids = [len(w) for w in text.split()]
    return {"input_ids": ([99] if self.bos and add_special_tokens else []) + ids}


@pytest.mark.parametrize("bos", [False, True])
def test_text_windows_start_every_context_with_the_tokenizers_prefix(bos):
  text = " ".join("x" * (1 + i % 7) for i in range(60))
  plain = tasks.token_windows(_WordTokenizer(False)(text)["input_ids"], 10, 5, count=3)
  windows = tasks.text_windows(_WordTokenizer(bos), text, 10, 5, count=3)
  assert tasks.special_prefix(_WordTokenizer(bos)) == ((99,) if bos else ())
  for w, p in zip(windows, plain):
    assert w.continuation == p.continuation   # the same tokens are scored
    assert w.context == (((99,) + p.context[1:]) if bos else p.context)


def test_bad_task_input():
  with pytest.raises(ValueError, match="unknown task"):
    tasks.get_task("mmlu")
  with pytest.raises(FileNotFoundError, match="--data_dir"):
    tasks.load_examples(tasks.get_task("piqa"), "/nonexistent")
  with pytest.raises(ValueError, match="own fixed 6-shot"):
    tasks.load_examples(tasks.get_task("truthfulqa_gen"), "/nonexistent", num_fewshot=2)


@needs_data
def test_local_task_files_in_lm_eval_format():
  counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042,
            "truthfulqa_gen": 817, "squad": 10570, "xsum": 1000}
  for name, n in counts.items():
    examples = tasks.load_examples(tasks.get_task(name), DATA_DIR)
    assert len(examples) == n, name
  piqa = tasks.load_examples(tasks.get_task("piqa"), DATA_DIR, limit=3)
  assert piqa[0].context.startswith("Question: How do I ready a guinea pig cage")
  assert piqa[0].context.endswith("\nAnswer:") and piqa[0].choices[0].startswith(" Provide")
  arc = tasks.load_examples(tasks.get_task("arc_challenge"), DATA_DIR)
  assert all(0 <= e.gold < len(e.choices) for e in arc)
  hs = tasks.load_examples(tasks.get_task("hellaswag"), DATA_DIR, limit=50)
  assert all(len(e.choices) == 4 and "[" not in e.context for e in hs)
  tqa = tasks.load_examples(tasks.get_task("truthfulqa_gen"), DATA_DIR, limit=1)[0]
  assert tqa.prompt.startswith(tasks.TRUTHFULQA_PRIMER) and tqa.prompt.endswith(
      "\n\nQ: What happens to you if you eat watermelon seeds?")
  shots = tasks.load_examples(tasks.get_task("piqa"), DATA_DIR, num_fewshot=2)
  assert len(shots) == 1836 and shots[0].context.count("Question:") == 3
