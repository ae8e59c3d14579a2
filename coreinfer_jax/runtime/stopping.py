"""Stopping: host-side bookkeeping of generated tokens, EOS, stop strings and streamed text.

`StopTracker` takes one new token per sequence per decode step, ends a
sequence on an EOS id or once its text holds a stop string (the text is cut
where the first stop string begins), and streams each sequence's new text.

Detokenisation is incremental, as in vLLM and Hugging Face TGI: each step
decodes only a short window, the last settled tokens (context) and those
since, and takes the new text as decode(context + pending) minus
decode(context). The context keeps a token's leading space, which decoding it
alone loses with SentencePiece and byte-level BPE tokenizers. Text ending in
U+FFFD (an incomplete multi-byte character) is held back until complete, and
so is an ending that may begin a stop string, so that streamed text is never
taken back. Stop strings are searched for only in the new text and that held
back before it (at most the longest stop string less one character), where any
stop string the new text completes must begin. Each step's work is thus
bounded, and the whole linear in the generated length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from coreinfer_jax.model.config import ModelConfig

REPLACEMENT = "\ufffd"   # what decoding makes of an incomplete multi-byte character


@dataclasses.dataclass
class GenerationResult:
  token_ids: List[int]
  text: Optional[str]
  prompt_tokens: int
  finish_reason: str        # "eos", "stop_string" or "length"


def eos_ids(config: ModelConfig, tokenizer: Any = None) -> Tuple[int, ...]:
  """The ids that end a sequence: the config's and the tokenizer's."""
  eos = list(config.eos_token_ids)
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    eos.append(tokenizer.eos_token_id)
  return tuple(sorted(set(eos)))


class _TextStream:
  """One sequence's text, decoded incrementally and searched for stop strings."""

  def __init__(self, tokenizer: Any, stops: Tuple[str, ...]):
    self._tokenizer = tokenizer
    self._stops = stops
    self._longest_prefix = max([0] + [len(s) - 1 for s in stops])   # of a stop string, proper
    self._context: List[int] = []   # the tokens of the last settled text
    self._context_text = ""         # their text, decoded alone
    self._pending: List[int] = []   # the tokens since, their text not yet complete
    self._taken = 0                 # chars of the pending text already taken
    self._held = ""                 # taken, not streamed: the longest ending that may begin a stop
    self._incomplete = ""           # the pending text's trailing U+FFFDs
    self.pieces: List[str] = []     # the streamed text

  def _decode(self, ids: List[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def add(self, token: int) -> Tuple[str, bool]:
    """(text to stream, whether a stop string ended the text)."""
    self._pending.append(token)
    text = self._decode(self._context + self._pending)[len(self._context_text):]
    complete = text.rstrip(REPLACEMENT)
    self._incomplete = text[len(complete):]
    fresh = self._held + complete[self._taken:]
    if complete and not self._incomplete:
      self._context, self._pending, self._taken = self._pending, [], 0
      self._context_text = self._decode(self._context)
    else:
      self._taken = len(complete)
    unstreamed = fresh + self._incomplete
    found = [i for i in (unstreamed.find(s) for s in self._stops) if i >= 0]
    if found:
      self._held = self._incomplete = ""
      return self._stream(unstreamed[:min(found)]), True
    hold = next((k for k in range(min(len(fresh), self._longest_prefix), 0, -1)
                 if any(s.startswith(fresh[-k:]) for s in self._stops)), 0)
    self._held = fresh[len(fresh) - hold:]
    return self._stream(fresh[:len(fresh) - hold]), False

  def flush(self) -> str:
    """Streams what was held back: the text is over."""
    rest, self._held, self._incomplete = self._held + self._incomplete, "", ""
    return self._stream(rest)

  def _stream(self, piece: str) -> str:
    if piece:
      self.pieces.append(piece)
    return piece


class StopTracker:
  """Host-side bookkeeping of each sequence's tokens, stop conditions and text.

  `on_text(b, piece)` receives sequence b's text as it settles; the pieces
  join to the final text (`results`). A sequence stopped by a stop string
  keeps its text up to where the stop string begins."""

  def __init__(self, batch: int, eos_ids: Sequence[int], stop_strings: Sequence[str],
               tokenizer: Any, on_text: Optional[Callable[[int, str], None]]):
    if (stop_strings or on_text) and tokenizer is None:
      raise ValueError("stop strings and streaming need a tokenizer")
    self.tokens: List[List[int]] = [[] for _ in range(batch)]
    self.reasons: List[Optional[str]] = [None] * batch
    self._eos = set(eos_ids)
    self._tokenizer = tokenizer
    self._on_text = on_text
    self._streams: List[_TextStream] = []
    # Special tokens that decoding drops: left out of the decoded windows, so
    # that a run of them does not widen a window.
    self._skipped: FrozenSet[int] = frozenset()
    if tokenizer is not None:
      self._streams = [_TextStream(tokenizer, tuple(stop_strings)) for _ in range(batch)]
      self._skipped = frozenset(i for i in tokenizer.all_special_ids
                                if tokenizer.decode([i], skip_special_tokens=True) == "")

  @property
  def texts(self) -> List[str]:
    """Each sequence's text streamed so far."""
    if self._tokenizer is None:
      return [""] * len(self.tokens)
    return ["".join(s.pieces) for s in self._streams]

  def _emit(self, b: int, piece: str) -> None:
    if piece and self._on_text:
      self._on_text(b, piece)

  def add(self, new_tokens_B: np.ndarray) -> bool:
    """Records one token per live sequence; True when all have stopped."""
    for b, token in enumerate(new_tokens_B.tolist()):
      if self.reasons[b] is not None:
        continue
      if token in self._eos:
        self.reasons[b] = "eos"
        if self._tokenizer is not None:
          self._emit(b, self._streams[b].flush())
        continue
      self.tokens[b].append(token)
      if self._tokenizer is None or token in self._skipped:
        continue
      piece, stopped = self._streams[b].add(token)
      if stopped:
        self.reasons[b] = "stop_string"
      self._emit(b, piece)
    return all(r is not None for r in self.reasons)

  def results(self, prompt_lens: Sequence[int]) -> List[GenerationResult]:
    """Each sequence's result; streams the text still held back of those not
    stopped by a stop string."""
    out = []
    for b, n in enumerate(prompt_lens):
      text = None
      if self._tokenizer is not None:
        if self.reasons[b] == "stop_string":
          text = "".join(self._streams[b].pieces)
        else:
          self._emit(b, self._streams[b].flush())
          text = self._tokenizer.decode(self.tokens[b], skip_special_tokens=True)
      out.append(GenerationResult(self.tokens[b], text, n, self.reasons[b] or "length"))
    return out
