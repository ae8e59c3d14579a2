"""Task metrics, through the libraries that define them.

Multiple choice: lm-eval's acc and acc_norm (log-likelihood normalised by the
choice's length in characters). TruthfulQA: lm-eval's own `truthfulqa_gen`
scoring (t5-style BLEU and ROUGE max/diff/acc). SQuAD v1.1: the official
exact match and F1. XSum: rouge-score's ROUGE-1/2/Lsum F-measure. WMT: sacrebleu
corpus BLEU and chrF.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, List, Sequence

import numpy as np


def multiple_choice(logprob_sums: Sequence[float], choices: Sequence[str], gold: int) -> Dict[str, float]:
  """acc and acc_norm of one example, as lm-eval's `multiple_choice` output type."""
  lls = np.asarray(logprob_sums, np.float64)
  lengths = np.array([float(len(c)) for c in choices])
  return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lengths) == gold)}


def truthfulqa(completion: str, correct: Sequence[str], incorrect: Sequence[str]) -> Dict[str, float]:
  """lm-eval's truthfulqa_gen metrics of one completion (its answer cleaning,
  then its `process_results_gen`)."""
  from lm_eval.tasks.truthfulqa import utils as tqa   # imports `datasets`: only when used
  doc = tqa.preprocess_function({"question": "", "correct_answers": list(correct),
                                 "incorrect_answers": list(incorrect)})
  return {k: float(v) for k, v in tqa.process_results_gen(doc, [completion]).items()}


def _squad_normalize(text: str) -> str:
  """The official SQuAD v1.1 evaluation script's answer normalisation."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _squad_f1(prediction: str, truth: str) -> float:
  pred, gold = _squad_normalize(prediction).split(), _squad_normalize(truth).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad(prediction: str, answers: Sequence[str]) -> Dict[str, float]:
  """Exact match and F1 (0-100), each the max over the gold answers."""
  return {"exact_match": 100.0 * max(float(_squad_normalize(prediction) == _squad_normalize(a))
                                     for a in answers),
          "f1": 100.0 * max(_squad_f1(prediction, a) for a in answers)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
  """Mean ROUGE-1/2/Lsum F-measure (0-100) with Porter stemming, sentences
  split on newlines for ROUGE-Lsum."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {t: 100.0 * float(np.mean([s[t].fmeasure for s in scores])) for t in ROUGE_TYPES}


def translation(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
  """sacrebleu corpus BLEU and chrF (default settings)."""
  import sacrebleu
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
          "chrf": sacrebleu.corpus_chrf(list(predictions), [list(references)]).score}


def mean_metrics(per_example: List[Dict[str, float]]) -> Dict[str, float]:
  keys = per_example[0].keys() if per_example else ()
  return {k: float(np.mean([m[k] for m in per_example])) for k in keys}
