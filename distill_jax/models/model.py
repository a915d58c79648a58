"""`Model`: our Flax families behind one output contract; verified loading and export.

Contract (relied on by `objective.py`, `step.py`, `evaluate.py`):

* ``batch`` is a dict of arrays with at least ``input_ids`` ``[B, T]`` int32 and
  ``attention_mask`` ``[B, T]`` (1 = real token, 0 = padding).  Optional keys:
  ``token_type_ids``, ``position_ids`` ``[B, T]``, ``labels`` and ``loss_mask``.  A padded
  *example* (eval padding) has an all-zero ``attention_mask`` row.
* ``Model.apply(params, batch, *, outputs=("logits",), train=False, rng=None, pooling="mean")``
  is a pure function usable inside ``jax.jit`` and returns :class:`ModelOutputs` holding only
  the requested fields.  ``Model.capabilities`` names what a task can give (an ``encoder``
  has no ``logits``); asking for more is a ValueError.
* ``final_hidden`` is the trunk's output and ``Model.head(params)`` (causal LM) the
  unembedding that turns it into logits, so that logit losses can chunk the vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import checkpoints, decoder, encoder
from distill_jax.models.layers import check_remat
from distill_jax.models.outputs import OUTPUT_NAMES, POOLINGS, TASKS, Head, ModelOutputs, pool

# The family modules: each exports FAMILIES (its registered traits), TASKS, spec_from_hf,
# params_from_hf, params_to_hf, hf_architecture and one Linen module class.
DECODER_FAMILIES = decoder.FAMILIES
ENCODER_FAMILIES = encoder.FAMILIES
FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES
_FAMILY_MODULES = {**{family: (decoder, decoder.Decoder) for family in DECODER_FAMILIES},
                   **{family: (encoder, encoder.Encoder) for family in ENCODER_FAMILIES}}


def family_module(family: str):
  """(family module, Linen class) of an HF `model_type`; one-line error naming the allowed ones."""
  if family not in _FAMILY_MODULES:
    raise ValueError(f"family: unknown model_type {family!r}; allowed: {', '.join(FAMILIES)}")
  return _FAMILY_MODULES[family]


def check_task(task: str, family: Optional[str] = None) -> None:
  if task not in TASKS:
    raise ValueError(f"task: unknown {task!r}; allowed: {', '.join(TASKS)}")
  if family is not None:
    tasks = family_module(family)[0].TASKS
    if task not in tasks:
      raise ValueError(f"task: {task!r} is not available for family {family!r}; allowed: {', '.join(tasks)}")


def _check_dtypes(**dtypes) -> None:
  for field, value in dtypes.items():
    try:
      ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{field}: {value!r} is not a floating dtype (e.g. 'float32', 'bfloat16')")


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """One of our Flax families behind one output contract.

  Not a pytree: params travel separately (`apply(params, batch)`), so the teacher's params
  can be a jit argument rather than a constant.

  Attributes:
    module: the Linen module (`Decoder` or `Encoder`) with its family spec.
    params: the params pytree (nested dicts; per-layer params stacked on a leading axis).
    hf_config: the Hugging Face `PretrainedConfig` (what export writes as config.json).
    tokenizer: the checkpoint's tokenizer, or None.
    task: one of `TASKS`.
    family: the HF `model_type` (`"bert"`, `"llama"`, ...).
    dtype: the computation dtype.
    source: the checkpoint directory it came from (for sentence-transformers files), or None.
  """

  module: Any
  params: Any
  hf_config: Any
  tokenizer: Any
  task: str
  family: str
  dtype: Any = jnp.float32
  source: Optional[pathlib.Path] = None

  @property
  def spec(self) -> Any:
    return self.module.spec

  @property
  def num_layers(self) -> int:
    return int(self.spec.num_layers)

  @property
  def hidden_size(self) -> int:
    return int(self.spec.hidden_size)

  @property
  def num_heads(self) -> int:
    return int(self.spec.num_heads)

  @property
  def vocab_size(self) -> int:
    """The usable vocabulary: the tokenizer's size when smaller than a padded embedding."""
    rows = int(self.spec.vocab_size)
    return min(rows, len(self.tokenizer)) if self.tokenizer is not None else rows

  @property
  def capabilities(self) -> frozenset[str]:
    """The output names `apply` can give for this task (an encoder has no logits)."""
    return frozenset(n for n in OUTPUT_NAMES if not (n == "logits" and self.task == "encoder")
                     and not (n == "head" and self.task != "causal_lm"))

  def check_outputs(self, outputs: Sequence[str] | str) -> tuple[str, ...]:
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    for name in outputs:
      if name not in OUTPUT_NAMES:
        raise ValueError(f"outputs: unknown {name!r}; allowed: {', '.join(OUTPUT_NAMES)}")
      if name not in self.capabilities:
        raise ValueError(f"outputs: {name!r} is not available for family {self.family!r} (task {self.task!r}); "
                         f"it gives {', '.join(sorted(self.capabilities))}")
    return outputs

  def apply(self, params, batch: Mapping[str, jax.Array], *, outputs: Sequence[str] = ("logits",),
            train: bool = False, rng: Optional[jax.Array] = None, pooling: str = "mean") -> ModelOutputs:
    """Runs the model on `batch`, computing only the requested `outputs`.

    Args:
      params: params pytree (e.g. `self.params` or a trained copy).
      batch: `input_ids` `[B, T]`, `attention_mask` `[B, T]`, optional `token_type_ids`,
        `position_ids` (decoders default to the positions of the real tokens, so left and
        right padding give the same numbers).
      outputs: names from `OUTPUT_NAMES`.
      train: dropout is on when `train` and `rng` is given.
      rng: PRNG key for dropout.
      pooling: `"mean"` (mean over `attention_mask`) or `"cls"` (first position) for `pooled`.

    Returns:
      `ModelOutputs` with the requested fields set.
    """
    outputs = self.check_outputs(outputs)
    if pooling not in POOLINGS:
      raise ValueError(f"pooling: unknown {pooling!r}; allowed: {', '.join(POOLINGS)}")
    input_ids = jnp.asarray(batch["input_ids"])
    attention_mask = jnp.asarray(batch.get("attention_mask", jnp.ones_like(input_ids)))
    dropout = train and rng is not None
    result = self.module.apply(
        {"params": params}, input_ids, attention_mask, batch.get("position_ids"), batch.get("token_type_ids"),
        want=frozenset(outputs) - {"pooled", "final_hidden", "head"}, deterministic=not dropout,
        rngs={"dropout": rng} if dropout else {})
    fields = {name: result[name] for name in outputs if name not in ("pooled", "final_hidden", "head")}
    if "final_hidden" in outputs:
      fields["final_hidden"] = result["last_hidden"]
    if "head" in outputs:
      fields["head"] = self.head(params)
    if "pooled" in outputs:
      fields["pooled"] = pool(result["last_hidden"], attention_mask, pooling)
    return ModelOutputs(**fields)

  def head(self, params) -> Head:
    """The unembedding of a causal LM: ``apply(outputs=("final_hidden",))`` then this head give
    its logits (``cap · tanh((h @ kernel) / cap)[..., :vocab]``) without forming them.

    Args:
      params: params pytree (e.g. `self.params` or a trained copy); a tied head reads the embedding.

    Returns:
      `Head` ``(kernel [H, V] in the compute dtype, bias or None, softcap or None, vocab)``.
    """
    if self.task != "causal_lm":
      raise ValueError(f"head: needs task 'causal_lm' (an unembedding from final hidden states); "
                       f"this model's task is {self.task!r}")
    kernel, bias, softcap = family_module(self.family)[0].unembedding(self.spec, params, self.dtype)
    return Head(kernel, bias, softcap, self.vocab_size)

  def save_pretrained(self, params, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes `params` as an HF checkpoint transformers (PyTorch) loads.

    `config.json`, `model.safetensors` (PyTorch names; a tied head is left to be re-tied),
    the tokenizer, and the teacher's sentence-transformers modules when it had them.
    """
    fam = family_module(self.family)[0]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    checkpoints.write_safetensors(fam.params_to_hf(host, self.spec, self.task), out)
    config = copy.deepcopy(self.hf_config)
    config.architectures = [fam.hf_architecture(self.spec, self.task)]
    config.dtype = "float32"  # the weights written (a bf16 teacher's config would load them as bf16)
    config.save_pretrained(out)
    os.chmod(out / "config.json", checkpoints.FILE_MODE)
    if self.tokenizer is not None:
      self.tokenizer.save_pretrained(out)
    if self.source is not None:
      checkpoints.copy_sentence_transformers_files(self.source, out)
    return out


# ----------------------------------------------------------------------------- constructors


def load_config(source: Any, **overrides):
  """An HF config from a checkpoint directory, a config dict (with `model_type`) or a config."""
  import transformers

  if isinstance(source, transformers.PretrainedConfig):
    config = copy.deepcopy(source)
  elif isinstance(source, Mapping):
    source = dict(source)
    model_type = source.pop("model_type", None)
    family_module(model_type)  # a one-line error for an unknown family
    config = transformers.AutoConfig.for_model(model_type, **source)
  else:
    raw = checkpoints.read_config_dict(pathlib.Path(source)) or {}
    family_module(raw.get("model_type"))  # before transformers parses (and maybe rejects) it
    config = transformers.AutoConfig.from_pretrained(source)
  for key, value in overrides.items():
    setattr(config, key, value)
  family_module(config.model_type)
  return config


def _check_remat(remat: str) -> None:
  check_remat(remat)  # one-line error; the names are `layers.REMAT_POLICIES`, defined once


def _build(config, task: str, dtype: Any, remat: str):
  _check_remat(remat)
  fam, cls = family_module(config.model_type)
  check_task(task, config.model_type)
  spec = fam.spec_from_hf(config.to_dict())
  return fam, cls(spec=spec, task=task, dtype=jnp.dtype(dtype), remat=remat)


def load_model(name_or_path: str | os.PathLike, task: str = "causal_lm", *, dtype: Any = "float32",
               param_dtype: Any = "float32", num_labels: Optional[int] = None,
               revision: Optional[str] = None, remat: str = "none") -> Model:
  """Loads and verifies an HF checkpoint (local directory or hub id in the HF cache).

  Args:
    name_or_path: a directory with `config.json` and `model.safetensors`,
      `pytorch_model.bin` or `flax_model.msgpack` (sharded too), or a hub id.
    task: one of `TASKS`.
    dtype: computation dtype.
    param_dtype: dtype the floating params are held in (e.g. bf16 for a teacher).
    num_labels: classes for `sequence_classification` (default: the config's).
    revision: hub revision.
    remat: `"none"`, `"full"` or `"dots"`: what the layer scan saves for the backward pass.

  Returns:
    A `Model` whose every parameter came from the checkpoint (a tied head is the embedding), as
    host NumPy arrays: the caller places them (sharded, replicated or on one device).

  Raises:
    ValueError: bad task/family/path, a config feature we do not implement (naming the
      field), missing weights (listed), no network and no cache.
  """
  check_task(task)
  _check_dtypes(dtype=dtype, param_dtype=param_dtype)
  _check_remat(remat)  # before any file is read
  path = checkpoints.resolve_checkpoint(name_or_path, revision)
  config = load_config(path, **({} if num_labels is None else {"num_labels": int(num_labels)}))
  fam, module = _build(config, task, dtype, remat)
  flat = fam.params_from_hf(checkpoints.read_state_dict(path), module.spec, task)
  floating = jnp.dtype(param_dtype)
  # Host (NumPy) arrays: nothing lands on a device until the caller places it, so a teacher
  # too large for one device can be sharded straight from the host (`step.shard_teacher_params`).
  params = jax.tree.map(lambda x: np.asarray(x, floating if np.issubdtype(np.asarray(x).dtype, np.floating)
                                             else None), flat)
  return Model(module=module, params=params, hf_config=config, tokenizer=checkpoints.load_tokenizer(path),
               task=task, family=config.model_type, dtype=jnp.dtype(dtype), source=path)


def init_params(module: nn.Module, seed: int = 0) -> Any:
  """Fresh float32 params of `module` (normal(0.02) kernels, as HF initializes)."""
  ids = jnp.ones((1, 8), jnp.int32)
  variables = jax.jit(module.init)(jax.random.key(seed), ids, jnp.ones_like(ids))
  return nn.meta.unbox(variables["params"])


def model_from_config(config: Any, task: str = "causal_lm", *, tokenizer: Any = None, seed: int = 0,
                      dtype: Any = "float32", remat: str = "none", source: Optional[pathlib.Path] = None,
                      **config_overrides) -> Model:
  """A freshly initialized (f32 params) model from an HF config, config dict or checkpoint dir."""
  check_task(task)
  _check_dtypes(dtype=dtype)
  config = load_config(config, **config_overrides)
  _, module = _build(config, task, dtype, remat)
  return Model(module=module, params=init_params(module, seed), hf_config=config, tokenizer=tokenizer,
               task=task, family=config.model_type, dtype=jnp.dtype(dtype), source=source)


def logical_axes(model: Model) -> dict[tuple[str, ...], tuple[Optional[str], ...]]:
  """Param path -> logical axis names (e.g. ``("layers", "embed", "mlp")``) of `model`'s params.

  Read from the module's own annotations (`layers.dense` and the embeddings name their
  axes); `distill_jax.training.sharding.LOGICAL_RULES` maps the names onto the mesh.
  """
  ids = jnp.ones((1, 8), jnp.int32)
  boxed = jax.eval_shape(model.module.init, jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return {tuple(str(k.key) for k in path): tuple(leaf.names) for path, leaf in flat
          if isinstance(leaf, nn.Partitioned)}
