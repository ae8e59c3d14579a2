"""Generates text, streaming it, and reports prefill time and decode speed.

  python scripts/generate.py --prompt="The capital of France is"
  python scripts/generate.py --prompts_file=prompts.txt --json_out=out.json
  python scripts/generate.py --prompt="..." --method=stability --beta=0.4 --scoring=magnitude
  python scripts/generate.py --prompt="..." --method=similarity --cluster_dir=clusters/tqa
  coreinfer-generate --prompt="Write a haiku." --chat --stop="\\n\\n"

Backslash escapes in --prompt and --stop are read as in a Python string
(`--stop="\\n\\n"` stops at a blank line; `\\\\` is one backslash;
--noescapes takes them as typed).
Prompts are tokenized and checked against --cache_len before the weights load.
"""

import dataclasses
import sys

from absl import flags

from coreinfer_jax import checkpoint
from coreinfer_jax.bench import rounds
from coreinfer_jax.cli import app, escapes, models
from coreinfer_jax.cli import flags as cli_flags
from coreinfer_jax.core import methods
from coreinfer_jax.runtime import distributed, offload
from coreinfer_jax.runtime import lossless
from coreinfer_jax.runtime import verify as verifying
from coreinfer_jax.runtime import prompts as prompt_encoding
from coreinfer_jax.runtime.batching import DEFAULT_BUCKETS, pick_bucket, resolve_dtype
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.sampling import SamplingConfig

cli_flags.define_model_flags()
cli_flags.define_mesh_flags()
cli_flags.define_offload_flags()
cli_flags.define_core_flags()
flags.DEFINE_string("prompt", None, f"the prompt; {escapes.HELP}")
flags.DEFINE_string("prompts_file", None, "a UTF-8 file of prompts, one per line (taken as "
                    "written: no escapes), run one after another")
flags.DEFINE_integer("max_new_tokens", 64, "most tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0: greedy")
flags.DEFINE_integer("top_k", 0, "0: off")
flags.DEFINE_float("top_p", 1.0, "1: off")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_multi_string("stop", [], f"stop string (repeatable); {escapes.HELP}")
flags.DEFINE_boolean("escapes", True, "read backslash escapes in --prompt and --stop "
                     "(--noescapes takes them as typed, e.g. LaTeX such as \\theta)")
flags.DEFINE_boolean("chat", False, "wrap the prompt in the tokenizer's chat template")
flags.DEFINE_boolean("stream", True, "print text as it is generated")
flags.DEFINE_string("json_out", None, "write results as JSON here")
flags.DEFINE_integer("verify", 0, "lossless mode (sparse methods): the compact-FFN model drafts "
                     "this many tokens, the dense model verifies them in one pass and keeps the "
                     "longest prefix it agrees with (greedy: exactly dense greedy decoding; "
                     "sampling: the dense distribution); 0: off")
flags.DEFINE_integer("refresh", 0, "with --verify (stability): every this many kept tokens, add "
                     "their dense FFN values (from the verify pass) to the prompt's ranking keys "
                     "and re-gather the core sets (same k, no recompilation); 0: off")
flags.DEFINE_boolean("preload_clusters", False, "similarity: gather every cluster's compact "
                     "FFNs at start (default: each on first use)")
flags.DEFINE_boolean("time_selection", True, "sparse methods: time the selecting prefill "
                     "and a dense prefill of each prompt over 3 interleaved rounds (5 extra "
                     "prefills per prompt), to report the selection's cost "
                     "(select_gather_seconds, or why it was not measurable)")
FLAGS = flags.FLAGS


def _prompts():
  if (FLAGS.prompt is None) == (FLAGS.prompts_file is None):
    raise ValueError("give exactly one of --prompt or --prompts_file")
  if FLAGS.prompt is not None:
    prompt = _as_meant(FLAGS.prompt, "--prompt")
    if not prompt.strip():
      raise ValueError("--prompt is empty")
    return [prompt]
  return prompt_encoding.read_prompts(FLAGS.prompts_file)


def _as_meant(text, flag):
  """`text` with its escapes read (unless --noescapes)."""
  if not FLAGS.escapes:
    return text
  try:
    return escapes.unescape(text)
  except ValueError as e:
    raise ValueError(f"{flag}: {e}") from None


def _stop_strings():
  stops = [_as_meant(s, "--stop") for s in FLAGS.stop]
  if any(not s for s in stops):
    raise ValueError("--stop is empty")
  return stops


def _encode_all(tokenizer, prompts, s):
  """Token ids of every prompt, each checked to fit the cache with its new tokens."""
  encoded = []
  for number, prompt in enumerate(prompts, 1):
    ids = prompt_encoding.encode(tokenizer, prompt, s["chat"])
    try:
      pick_bucket(len(ids), s["max_new_tokens"], s["cache_len"], DEFAULT_BUCKETS)
    except ValueError as e:
      where = "" if len(prompts) == 1 else f"prompt {number} of {FLAGS.prompts_file}: "
      raise ValueError(f"{where}{e} (raise --cache_len or lower --max_new_tokens)") from None
    encoded.append(ids)
  return encoded


def main(argv):
  del argv
  s = app.settings(["dtype", "cache_len", "max_new_tokens", "temperature", "top_k", "top_p",
                    "seed", "chat", "tp"] + cli_flags.CORE_FLAGS)
  if s["max_new_tokens"] < 1:
    raise ValueError(f"--max_new_tokens must be at least 1, got {s['max_new_tokens']}")
  sampling = SamplingConfig(s["temperature"], s["top_k"], s["top_p"])
  prompts = _prompts()
  stop_strings = _stop_strings()
  config = models.model_config(FLAGS.model)
  mesh = cli_flags.mesh_from_flags(config)
  leader = distributed.is_leader()   # with several processes, only the first prints and writes
  stream = FLAGS.stream and leader
  json_out = FLAGS.json_out if leader else None
  policy = methods.policy_for(s["method"], s, config, cluster_dir=s["cluster_dir"],
                              fingerprint=models.model_fingerprint(FLAGS.model))
  core = policy.spec
  policy.check_decoding(s["tp"], FLAGS.offload_ffn, FLAGS.verify)
  offload.check_offload(FLAGS.offload_ffn, core is not None, s["tp"], FLAGS.offload_gather)
  verifying.check_verify(FLAGS.verify, core is not None, s["tp"] > 1, FLAGS.offload_ffn)
  lossless.check_refresh(FLAGS.refresh, FLAGS.verify, policy)
  tokenizer = checkpoint.load_tokenizer(checkpoint.model_path(FLAGS.model))
  prompt_ids = _encode_all(tokenizer, prompts, s)
  m, load_seconds = models.load(FLAGS.model, resolve_dtype(s["dtype"]), with_tokenizer=False)
  m = dataclasses.replace(m, tokenizer=tokenizer)
  print(f"[loaded {m.path} in {load_seconds:.1f}s]", file=sys.stderr)
  if core:
    print(f"[{s['method']}: {policy.core_summary()}]", file=sys.stderr)
  gen = Generator(m.config, m.params, m.tokenizer, cache_len=s["cache_len"], sampling=sampling,
                  seed=s["seed"], policy=policy, preload=FLAGS.preload_clusters,
                  time_selection=FLAGS.time_selection, mesh=mesh, offload_ffn=FLAGS.offload_ffn,
                  offload_gather=FLAGS.offload_gather, verify=FLAGS.verify,
                  refresh=FLAGS.refresh)
  records = []
  for prompt, ids in zip(prompts, prompt_ids):
    if stream:   # a chat answer is a turn of its own, not the prompt's continuation
      print(prompt, end="\n" if s["chat"] else "", flush=True)
    on_text = (lambda b, piece: print(piece, end="", flush=True)) if stream else None
    (result,), stats = gen.generate_ids([ids], s["max_new_tokens"], stop_strings=stop_strings,
                                        on_text=on_text)
    if leader:
      print("" if stream else result.text)
    selection_rounds = len(stats.selecting_prefill_rounds)
    timing = rounds.prefill_figures(stats.selecting_prefill_rounds,
                                    [stats.gather_seconds] * selection_rounds,   # one gather, every round
                                    stats.dense_prefill_rounds)
    records.append({
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        **rounds.fields("prefill_seconds", timing.prefill),
        **rounds.fields("select_gather_seconds", timing.select_gather if core else None),
        "gather_seconds": stats.gather_seconds if core else None,
        "ffn_bytes_fraction": stats.ffn_bytes_fraction,
        "decode_tokens_per_second": stats.decode_tokens_per_second,
        "decode_compiles": gen.compiled.compiles["decode"],
        "decode_weight_bytes_per_device": stats.decode_weight_bytes_per_device,
        "core_device_load": stats.core_device_load,
        "memory": stats.memory,
        "cluster_id": None if stats.cluster_ids is None else stats.cluster_ids[0],
        **(stats.verify_record(gen.verify, 1, gen.lossless.refresh) if gen.verify else {}),
    })
    app.write_json(json_out, _payload(records, len(prompts), m.path, s["method"], policy,
                                      load_seconds, gen))   # saved before it is reported
    print(f"[prompt {result.prompt_tokens} tokens, "
          + ("" if selection_rounds == 1 else f"min/median/max over {selection_rounds} rounds: ")
          + rounds.describe("prefill", timing.prefill, 1, " ms", 1e3)
          + ("" if core is None else f" ({rounds.describe_selection(timing)})")
          + ("" if stats.cluster_ids is None else f" (cluster {stats.cluster_ids[0]})") + ", "
          f"{len(result.token_ids)} new tokens, decode {stats.decode_tokens_per_second:.1f} tokens/s, "
          + ("" if not gen.verify else
             f"{stats.drafts_accepted} of {stats.verify_rounds * gen.verify} drafts accepted, ")
          + f"stop: {result.finish_reason}]", file=sys.stderr)
  print(f"[compiles {dict(gen.compiled.compiles)}, compile seconds "
        f"{ {k: round(v, 2) for k, v in gen.compiled.compile_seconds.items()} }, "
        f"load {load_seconds:.1f}s]", file=sys.stderr)


def _payload(records, num_prompts, path, method, policy, load_seconds, gen):
  """The JSON: one prompt's record, or every finished prompt's under "results"
  (rewritten after each prompt, so an interrupted run keeps them)."""
  payload = dict(records[0]) if num_prompts == 1 else {"results": records}
  payload.update(model=path, method=method, core=policy.core_summary(),
                 load_seconds=load_seconds, compile_seconds=dict(gen.compiled.compile_seconds),
                 decode_compiles=gen.compiled.compiles["decode"], tp=gen.mesh.size if gen.mesh else 1,
                 core_placement=gen.core_placement)
  return payload


def entry():
  app.run(main, output_files=["json_out"])
