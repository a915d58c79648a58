"""The run's sections besides the objective: teachers, student, data, optimizer, loop,
devices, checkpoints, evaluation, export, logging, sequence-KD generation."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional

import optax
from pydantic import BeforeValidator, Field, StrictFloat, model_validator

from distill_jax import optim
from distill_jax.models.layers import ATTENTION_IMPLS, LAYER_LOOPS, REMAT_POLICIES
from distill_jax.schema import (SELF_TEACHER, Bool, DType, Fraction, Int, NonNegFloat, NonNegInt, PosFloat,
                                       PosInt, Section, Task, Unit, UnitOpen, field_of, invalid, section)

# ----------------------------------------------------------------------------------------
# Schema. `[x]` in a comment: the value an unset (null) option takes.


@section("teachers.<name>")
class TeacherConfig(Section):
  """One frozen teacher (`teachers.<name>`): a model, or its offline cache (`cache`)."""

  # checkpoint dir or hub id; `pkg:<module>` (see resolve_model_path); `student` (self-distillation)
  path: Optional[str] = None
  # a `distill-jax cache-teacher` directory: training reads the teacher's top-k log-probs from it
  # and never loads the model (sparse_* logit terms only)
  cache: Optional[str] = None
  task: Task = "causal_lm"
  dtype: DType = "float32"  # compute dtype
  param_dtype: DType = "float32"  # dtype of the weights on device
  num_labels: Optional[PosInt] = None  # classes of a sequence_classification head [from the checkpoint]

  @model_validator(mode="after")
  def _rules(self):
    if self.path is None and self.cache is None:
      raise invalid(f"@path is required (a checkpoint, hub id, 'pkg:<module>' or '{SELF_TEACHER}'), or @cache "
                    f"(a teacher cache directory)", "path", "cache")
    if self.path is not None and not self.path.strip():
      raise invalid(f"@path must be a non-empty path, hub id, 'pkg:<module>' or '{SELF_TEACHER}'", "path")
    if self.cache is not None and (not self.cache.strip() or self.path == SELF_TEACHER):
      raise invalid(f"@cache must be a directory path (and @path not '{SELF_TEACHER}')", "cache")
    if self.cache is not None and self.task != "causal_lm":
      raise invalid(f"@cache: only causal_lm teachers are cached, got task {self.task}", "cache", "task")
    if self.num_labels is not None and self.task != "sequence_classification":
      raise invalid(f"@num_labels is only used when @task is sequence_classification, got task {self.task}",
                     "num_labels", "task")
    return self


@section("student")
class StudentConfig(Section):
  """The trainable student (`student`).

  ``init``: ``from_teacher`` (DistilBERT-style: the teacher's embeddings and a subset of its
  layers: ``layers``, strictly increasing 0-based indices, or every k-th), ``path`` (the
  checkpoint at ``path``) or ``config`` (random weights, the teacher's HF config with
  ``num_layers``/``hidden_size``/``config`` overrides).
  """

  init: Literal["from_teacher", "path", "config"] = "from_teacher"
  teacher: Optional[str] = None  # the teacher to derive from [the first]
  path: Optional[str] = None  # for init: path
  task: Optional[Task] = None  # [the teacher's]
  num_layers: Optional[PosInt] = None  # [len(layers), else the teacher's]
  layers: tuple[Int, ...] = ()
  hidden_size: Optional[PosInt] = None  # width of an init: config student [the teacher's]
  config: dict[str, Any] = field_of(dict)  # further HF config overrides, e.g. {intermediate_size: 512}
  num_labels: Optional[PosInt] = None  # [the teacher's]
  dtype: DType = "float32"
  param_dtype: DType = "float32"  # of the trained weights (keep float32 for mixed precision)
  seed: Optional[Int] = None  # of random initialization [train.seed]
  # what the layer scan keeps for backward (distill_jax.models.layers.REMAT_POLICIES): none (all), full
  # (nothing), dots (matmuls), save_block_outputs (attention and MLP outputs), save_qkv_block_outputs
  # (those and q, k, v), offload_block_outputs (attention and MLP outputs in pinned host memory)
  remat: Literal[REMAT_POLICIES] = "none"

  @model_validator(mode="after")
  def _rules(self):
    if self.init == "path" and not self.path:
      raise invalid("@path is required when @init is 'path'", "path", "init")
    if self.init != "path" and self.path is not None:
      raise invalid(f"@path is only used when @init is 'path', got init {self.init}", "path", "init")
    if self.init == "from_teacher" and self.hidden_size is not None:
      raise invalid("@hidden_size cannot change when @init is 'from_teacher' (weights are copied); use init: config",
                     "hidden_size", "init")
    if self.init != "from_teacher" and self.layers:
      raise invalid(f"@layers is only used when @init is 'from_teacher', got init {self.init}", "layers", "init")
    if any(i < 0 for i in self.layers) or list(self.layers) != sorted(set(self.layers)):
      raise invalid(f"@layers must be strictly increasing indices >= 0, got {list(self.layers)}", "layers")
    if self.layers and self.num_layers is not None and self.num_layers != len(self.layers):
      raise invalid(f"@num_layers must equal len(@layers) = {len(self.layers)}, got {self.num_layers}",
                     "num_layers", "layers")
    return self



@section("data.mixture[]")
class MixtureSourceConfig(Section):
  """One source of a weighted data mixture (`data.mixture`)."""

  source: str  # as data.source
  weight: PosFloat = 1.0  # relative share of the documents drawn
  name: Optional[str] = None  # hub dataset config name
  split: Optional[str] = None  # [data.split]
  validation_split: Optional[str] = None  # [data.validation_split]


@section("data")
class DataConfig(Section):
  """Training and validation text (`data`)."""

  source: str = "pydoc"  # pydoc (built-in offline Python docs), a hub dataset id, or a local file/dir
  name: Optional[str] = None  # hub dataset config name (e.g. sst2 of glue)
  split: str = "train"
  validation_split: Optional[str] = None  # [carve validation_fraction of split; pydoc has its own]
  validation_fraction: Fraction = 0.05
  # one text column, or two for text pairs (a single name may be given as a string)
  text_columns: Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v),
                          Field(min_length=1, max_length=2)] = ("text",)
  label_column: Optional[str] = None  # class labels (sequence classification / hard-label CE)
  # causal LM: completions of the prompts in text_columns[0]; the loss mask covers them only
  completion_column: Optional[str] = None
  format: Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "text"] = "auto"  # of local files
  max_length: PosInt = 128  # tokens per example (causal LM: the packed row, documents EOS-separated)
  global_batch_size: PosInt = 32  # examples per micro-step over all hosts/devices
  eval_batch_size: Optional[PosInt] = None  # [global_batch_size]
  mlm_probability: Fraction = 0.15
  buckets: Bool = True  # pad to a few power-of-two lengths instead of always max_length
  shuffle_seed: Optional[Int] = None  # [train.seed]
  max_examples: Optional[PosInt] = None  # [all]
  num_workers: NonNegInt = 0  # tokenization processes of datasets.map / prepare-data (0: in-process)
  streaming: Bool = False  # prepare-data reads the source as a stream (causal_lm packing; hub or files > RAM)
  shard_rows: Optional[PosInt] = None  # rows per prepare-data shard [about 64 MiB]
  prefetch: NonNegInt = 2  # training batches Grain prepares ahead
  cache_dir: Optional[str] = None  # datasets cache [the HF default]
  # instead of source: documents drawn from these sources by weight (seeded by train.seed) until one runs out
  mixture: tuple[MixtureSourceConfig, ...] = ()

  @model_validator(mode="after")
  def _rules(self):
    if not self.source.strip():
      raise invalid("@source must be 'pydoc', a hub dataset id or a local path", "source")
    if self.completion_column is not None and len(self.text_columns) != 1:
      raise invalid(f"@completion_column needs exactly one prompt column in @text_columns, got "
                     f"{list(self.text_columns)}", "completion_column", "text_columns")
    return self


@section("generate")
class GenerateConfig(Section):
  """Sequence-level KD (`generate`, ``distill-jax generate``): the main teacher continues the
  prompts of a data set and writes ``{"prompt", "completion"}`` JSON lines to `output`, which
  training reads with ``data.text_columns: [prompt]`` and ``data.completion_column: completion``."""

  source: str = "pydoc"  # the prompts: as data.source
  split: str = "train"
  prompt_column: str = "text"
  output: str = "teacher_completions.jsonl"
  prompt_length: PosInt = 64  # prompt tokens kept (the first ones)
  max_new_tokens: PosInt = 64
  temperature: NonNegFloat = 0.0  # 0: greedy
  top_k: NonNegInt = 0  # (0: off)
  top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0  # nucleus (1: off)
  batch_size: PosInt = 16  # prompts per generate call
  max_prompts: Optional[PosInt] = None  # [all]
  seed: Int = 0  # of the sampling (temperature > 0)

  @model_validator(mode="after")
  def _rules(self):
    if not self.output.strip():
      raise invalid("@output must be a non-empty path", "output")
    return self


@section("cache")
class CacheConfig(Section):
  """The offline teacher cache (`cache`, ``distill-jax cache-teacher``): per token of the
  training and validation rows, the teacher's `top_k` ids and log-probabilities and the log of
  the tail mass, in ``elias-fano`` + `value_bits` codes (``distill_jax.data.cache_codec``)."""

  teacher: Optional[str] = None  # the teacher to cache [the only one with a cache, else the main one]
  dir: Optional[str] = None  # where [that teacher's `cache`]
  top_k: PosInt = 128
  value_bits: Annotated[Int, Field(ge=4, le=8)] = 6  # bits per kept log-probability
  batch_size: PosInt = 16  # rows per teacher forward
  shard_rows: PosInt = 256  # rows per shard file (the unit of resuming)


@section("optimizer")
class OptimizerConfig(Section):
  """The student's optax optimizer (`optimizer`)."""

  name: Literal[optim.OPTIMIZERS] = "adamw"  # distill_jax.optim.OPTIMIZERS
  learning_rate: PosFloat = 1e-4  # peak
  schedule: Literal[optim.LR_SCHEDULES] = "cosine"  # decay after warm-up
  warmup_steps: NonNegInt = 0  # linear from 0 (clamped to train.steps)
  final_lr_fraction: Unit = 0.0  # learning rate at the last step / peak
  weight_decay: NonNegFloat = 0.01  # decoupled; never on norms and biases
  b1: UnitOpen = 0.9  # Adam β1; SGD momentum
  b2: UnitOpen = 0.999
  eps: PosFloat = 1e-8
  clip_norm: Optional[PosFloat] = 1.0  # global gradient-norm clipping (null: off)
  grad_accum_steps: PosInt = 1  # micro-batches per update (optax.MultiSteps)

  def build(self, steps: int) -> optax.GradientTransformation:
    """The optax optimizer of a run of `steps` micro-steps (``train.steps``).

    The schedule counts updates (`steps` / ``grad_accum_steps``, at least 1); a warm-up as long
    as the run is cut to one update less, so a short smoke run still reaches the peak.
    """
    accum = self.grad_accum_steps
    updates = max(steps // accum, 1)
    warmup = min(self.warmup_steps // accum, updates - 1)
    return optim.make_optimizer(
        self.name, self.learning_rate, warmup_steps=warmup, total_steps=updates, schedule=self.schedule,
        weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps, clip_norm=self.clip_norm,
        grad_accum_steps=accum, final_lr_fraction=self.final_lr_fraction)


@section("train")
class TrainConfig(Section):
  """The training loop (`train`)."""

  steps: PosInt = 1000  # optimizer updates
  seed: Int = 0  # of everything random (init, dropout, data order unless overridden)
  run_dir: str = "runs/default"  # config, metrics, checkpoints, report, exported student
  log_every: PosInt = 10
  eval_every: NonNegInt = 0  # (0: only before and after training)
  eval_batches: NonNegInt = 0  # validation batches per evaluation (0: all)
  max_nonfinite_steps: PosInt = 10  # consecutive skipped non-finite steps before stopping with an error
  precision: Literal["default", "high", "highest"] = "default"  # jax_default_matmul_precision
  # attention kernel of every model (distill_jax.models.layers.ATTENTION_IMPLS): auto (splash on TPU, cuDNN
  # on GPU, else XLA), xla, cudnn (GPU), splash (TPU); what a kernel can't do (maps, dropout) falls back, logged
  attention: Literal[ATTENTION_IMPLS] = "auto"
  # every model's layer stack (distill_jax.models.layers.LAYER_LOOPS): auto (unroll on CPU, else scan), scan
  # (one compiled layer body: compile time flat in depth), unroll (no per-layer slicing and stacking)
  layer_loop: Literal[LAYER_LOOPS] = "auto"

  @model_validator(mode="after")
  def _rules(self):
    if not self.run_dir.strip():
      raise invalid("@run_dir must be a non-empty path", "run_dir")
    return self


@section("mesh")
class MeshConfig(Section):
  """Device parallelism (`mesh`): ``jit`` (NamedSharding over ``(data, fsdp, tensor)``) or
  ``pmap`` (replicated state; ``fsdp`` and ``tensor`` must be 1)."""

  mode: Literal["jit", "pmap"] = "jit"
  data: Int = -1  # size of the data axis (-1: the devices left over)
  fsdp: Int = 1  # params sharded over it (-1: the devices left over)
  tensor: PosInt = 1  # heads, MLP width and vocabulary split over it

  @model_validator(mode="after")
  def _rules(self):
    for name in ("data", "fsdp"):
      value = getattr(self, name)
      if value != -1 and value < 1:
        raise invalid(f"@{name} must be -1 (all remaining devices) or >= 1, got {value}", name)
    if self.data == -1 and self.fsdp == -1:
      raise invalid("@data and @fsdp cannot both be -1", "data", "fsdp")
    for name in ("fsdp", "tensor"):
      if self.mode == "pmap" and getattr(self, name) != 1:
        raise invalid(f"@{name} must be 1 when @mode is pmap, got {getattr(self, name)}", name, "mode")
    return self


@section("distributed")
class DistributedConfig(Section):
  """Multi-host start-up with ``jax.distributed.initialize`` (`distributed`): on when
  ``coordinator`` is set or ``initialize`` is true."""

  coordinator: Optional[str] = None  # host:port of process 0
  num_processes: Optional[PosInt] = None  # required with coordinator
  process_id: Optional[NonNegInt] = None  # in [0, num_processes); required with coordinator
  initialize: Bool = False  # initialize without a coordinator (JAX detects TPU pods, SLURM)
  heartbeat_timeout_s: PosInt = 100  # a process silent that long counts as dead
  initialization_timeout_s: PosInt = 300  # to wait for every process to join

  @property
  def enabled(self) -> bool:
    """Whether this run calls ``jax.distributed.initialize``."""
    return self.initialize or self.coordinator is not None

  @model_validator(mode="after")
  def _rules(self):
    if self.coordinator is not None:
      if not re.fullmatch(r"[^\s:]+:\d{1,5}", self.coordinator):
        raise invalid(f"@coordinator must be 'host:port', got {self.coordinator!r}", "coordinator")
      for name in ("num_processes", "process_id"):
        if getattr(self, name) is None:
          raise invalid(f"@{name} is required when @coordinator is set", name, "coordinator")
    n = self.num_processes
    if self.process_id is not None and n is not None and self.process_id >= n:
      raise invalid(f"@process_id must be in [0, {n}), got {self.process_id}", "process_id")
    return self


@section("checkpoint")
class CheckpointConfig(Section):
  """Orbax checkpoints of the student (`checkpoint`), in ``<train.run_dir>/checkpoints``."""

  every: NonNegInt = 100  # steps between saves (0: at the end and on preemption only)
  keep_last: PosInt = 2
  keep_best: NonNegInt = 0  # best by best_metric, kept in addition (0: off)
  best_metric: str = "eval/loss"
  best_mode: Literal["min", "max"] = "min"
  async_save: Bool = True  # write in the background
  fallback: Bool = False  # resume from the previous good checkpoint when the latest is corrupt
  resume: Bool = True  # from the latest checkpoint in the run directory

  @model_validator(mode="after")
  def _rules(self):
    if self.keep_best and not self.best_metric.strip():
      raise invalid("@best_metric must name an eval metric when @keep_best > 0", "best_metric", "keep_best")
    return self


@section("eval")
class EvalConfig(Section):
  """The evaluation report (`eval`)."""

  before_and_after: Bool = True  # also evaluate the undistilled student
  throughput_batches: NonNegInt = 5  # timed inference batches of teacher and student (0: skip)


@section("export")
class ExportConfig(Section):
  """Export of the student as a Hugging Face checkpoint at the end (`export`)."""

  enabled: Bool = True
  dir: Optional[str] = None  # [<train.run_dir>/student]
  overwrite: Bool = False  # replace a non-empty directory


@section("logging")
class LoggingConfig(Section):
  """Where metrics go (`logging`); written once on multi-host."""

  tensorboard: Bool = True
  jsonl: Bool = True  # metrics.jsonl in the run directory
  progress_bar: Bool = True
