"""`distill-jax`: the thin command-line entry point.

Each command is a module of `distill_jax.commands` (train, eval, export, generate,
cache-teacher, bench, ...); this file only parses arguments and turns user errors into one-line messages with a non-zero exit code
(the full traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from distill_jax.errors import first_line

_TRAIN_HELP = """\
Distill a teacher into a student.

CONFIG is a YAML file (see configs/; each file starts with the command that runs it).
With no CONFIG the packaged default (configs/default.yaml) runs: the pretrained all-MiniLM-L6-v2 encoder is
distilled into a 3-layer student on the built-in Python-documentation corpus.

Every option of the config can be overridden with dotted KEY=VALUE pairs, values parsed
as YAML, for example:
  train.steps=100  train.run_dir=runs/try1  optimizer.learning_rate=3e-4
  objective.terms[0].temperature=4.0  data.source=my.jsonl  data.text_columns=[text]
  teachers.teacher.path=/path/to/hf/checkpoint  mesh.data=4 mesh.fsdp=2
  distributed.coordinator=127.0.0.1:1234 distributed.num_processes=2 distributed.process_id=0
The run resumes automatically from the latest checkpoint in train.run_dir.
"""


# Each command's module is imported when the command runs (deferred: it loads jax, transformers
# and the models, and `--help` or a bad argument must answer at once).

def _cmd_train(args: argparse.Namespace) -> int:
  from distill_jax.commands import common, train

  return train.main(common.load_command_config(args.items))


def _cmd_generate(args: argparse.Namespace) -> int:
  from distill_jax.commands import common, generate

  return generate.main(common.load_command_config(args.items))


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
  from distill_jax.commands import cache_teacher, common

  return cache_teacher.main(common.load_command_config(args.items))


def _cmd_prepare_data(args: argparse.Namespace) -> int:
  from distill_jax.commands import common, prepare_data

  return prepare_data.main(common.load_command_config([args.config, *args.overrides]), args.out_dir)


def _cmd_eval(args: argparse.Namespace) -> int:
  from distill_jax.commands import eval as eval_command

  return eval_command.main(args.run_dir, args.overrides)


def _cmd_export(args: argparse.Namespace) -> int:
  from distill_jax.commands import export

  return export.main(args.run_dir, args.out_dir, overwrite=args.overwrite, step=args.step)


def _cmd_plan(args: argparse.Namespace) -> int:
  from distill_jax.commands import plan

  return plan.main([args.config, *args.overrides], args.topology, json_out=args.json, search=not args.no_search,
                   max_compiles=args.max_compiles, hbm_gib=args.hbm_gib)


def _cmd_bench(args: argparse.Namespace) -> int:
  from distill_jax.commands import bench

  return bench.main(args.script, args.args)


def _is_user_error(e: BaseException) -> bool:
  """Bad input, environment problems and our own errors: one line, no traceback."""
  ours = type(e).__module__.startswith("distill_jax")
  return ours or isinstance(e, (ValueError, OSError, KeyError))  # UserError is a ValueError


def _config_items(p: argparse.ArgumentParser, func) -> None:
  """A command that takes ``CONFIG.yaml [KEY=VALUE ...]`` (see `_config`)."""
  p.add_argument("items", nargs="*", metavar="CONFIG.yaml [KEY=VALUE ...]",
                 help="YAML config followed by dotted overrides")
  p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="distill-jax",
      description="Knowledge distillation for language models on JAX accelerators.")
  parser.add_argument("--debug", action="store_true",
                      help="show full tracebacks for errors instead of a one-line message")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("train", help="distill a teacher into a student (default: the embedded MiniLM run)",
                     description=_TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [KEY=VALUE ...]",
                 help="optional YAML config followed by dotted overrides")
  p.set_defaults(func=_cmd_train)

  p = sub.add_parser("generate", help="sequence-level KD: the teacher writes completions of prompts to a jsonl",
                     description="Continue the prompts of generate.source (column generate.prompt_column) with the "
                     "config's main teacher (KV-cache decoding, greedy unless generate.temperature > 0) and write "
                     "{prompt, completion} JSON lines to generate.output; train on them with "
                     "data.text_columns=[prompt] data.completion_column=completion.")
  _config_items(p, _cmd_generate)

  p = sub.add_parser("cache-teacher", help="run a teacher once and cache its top-k log-probs for training",
                     description="Tokenize the config's training and validation data as `train` does, run the "
                     "teacher (cache.teacher, else the one with teachers.<name>.cache, else the main one) over every "
                     "row and write its top-k ids, log-probabilities and tail mass per token to cache.dir (default: "
                     "teachers.<name>.cache), with manifest.json. Resumable: a rerun computes only the missing "
                     "shards. Then `train` with teachers.<name>.cache=DIR never loads that teacher (sparse_* terms).")
  _config_items(p, _cmd_cache_teacher)

  p = sub.add_parser("prepare-data", help="tokenize the config's data once into on-disk shards to train from",
                     description="Tokenize the config's training and validation data as `train` does (same "
                     "tokenizer, packing, data.max_length) into fixed-length row shards in OUT_DIR with "
                     "manifest.json; data.streaming=true reads a hub dataset or large files as a stream. Resumable "
                     "(a rerun writes only the missing shards); each process of a multi-host job writes its share. "
                     "Then `train` with data.source=OUT_DIR reads each host's rows from disk.")
  p.add_argument("config", metavar="CONFIG.yaml")
  p.add_argument("out_dir", metavar="OUT_DIR")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
  p.set_defaults(func=_cmd_prepare_data)

  p = sub.add_parser("eval", help="evaluate a run's latest checkpoint against its teacher and write the report",
                     description="Evaluate the latest checkpoint of RUN_DIR (task metrics, agreement with "
                     "the teacher before and after distillation, sizes and throughput) and rewrite "
                     "RUN_DIR/report.md, report.json and the curves PNG.")
  p.add_argument("run_dir", help="a run directory written by `distill-jax train`")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                 help="overrides of the saved config (e.g. train.eval_batches=0 for the full set)")
  p.set_defaults(func=_cmd_eval)

  p = sub.add_parser("export", help="export a run's student as a Hugging Face checkpoint",
                     description="Write the student of RUN_DIR (latest checkpoint, or --step) to OUT_DIR as a "
                     "Hugging Face checkpoint that transformers (PyTorch) loads: model.safetensors, config and "
                     "tokenizer (plus the teacher's sentence-transformers modules when it had them). The write is "
                     "atomic (temp dir + rename).")
  p.add_argument("run_dir", help="a run directory written by `distill-jax train`")
  p.add_argument("out_dir", help="where to write the checkpoint (must be empty or absent)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: latest)")
  p.set_defaults(func=_cmd_export)

  p = sub.add_parser("plan", help="will the config fit a TPU slice? deviceless compile, memory per device, MFU estimate",
                     description="Compile CONFIG's train and eval steps for a TPU slice on this machine (libtpu, no "
                     "TPU: pip install -e \".[tpu]\"), reading only the models' config.json, and report per device the "
                     "params, optimizer state, batch, temporaries and total against the chip's HBM, the largest "
                     "global batch that fits, model FLOPs per step and a roofline estimate of step time and MFU. "
                     "Exits 1 with one line when the config does not fit.")
  p.add_argument("config", metavar="CONFIG.yaml", help="the run's YAML config")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, as for train")
  p.add_argument("--topology", required=True,
                 help="jax's topology (v5e:4x4, v5p:2x2x2, v5p:4x4x4, v6e:8x8, v4:2x2x4) or a cloud slice name "
                 "(v5e-16; v4/v5p names count TensorCores: v5p-16 is 8 chips)")
  p.add_argument("--json", metavar="OUT", default=None, help="also write the report as JSON to OUT")
  p.add_argument("--no-search", action="store_true", help="compile the config's batch only (no batch search)")
  p.add_argument("--max-compiles", type=int, default=6, help="train-step compiles the batch search may spend")
  p.add_argument("--hbm-gib", type=float, default=None,
                 help="plan against this many GiB per device instead of the chip's HBM (e.g. to keep headroom)")
  p.set_defaults(func=_cmd_plan)

  p = sub.add_parser("bench", help="run a benchmark script from benchmarks/",
                     description="Hand over to benchmarks/SCRIPT.py with the remaining arguments, e.g. "
                     "`distill-jax bench step --preset bert-base` (from a source checkout: the benchmarks are not "
                     "installed with the package).")
  p.add_argument("script", help="benchmark name (step, torch_reference, on_policy, vocab_kl, scaling, data, "
                 "teacher_cache)")
  p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
  p.set_defaults(func=_cmd_bench)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except Exception as e:  # pylint: disable=broad-except
    if args.debug or not _is_user_error(e):
      raise
    print(f"distill-jax: error: {first_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("distill-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
