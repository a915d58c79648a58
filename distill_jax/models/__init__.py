"""Our own Flax models of the Hugging Face families, behind one contract.

* `Model.apply(params, batch, outputs=...) -> ModelOutputs` (see `model.py`);
* `load_model` reads and verifies HF checkpoints (safetensors / bin / msgpack, sharded),
  `Model.save_pretrained` writes ones transformers (PyTorch) loads;
* `init_student`, `layer_map`, `check_vocab` (see `students.py`);
* `generate.generate`: jitted KV-cache decoding for the decoder families.

Families: decoders (`decoder.py`: Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1-3, SmolLM2/3,
GPT-2) and encoders (`encoder.py`: BERT, RoBERTa, DistilBERT), their layers scanned.  A family
is one registered traits record (`decoder_spec.REGISTRY`, `encoder_spec.REGISTRY`, keyed by HF
`model_type`): a new Llama-like family is one `decoder_spec.register(DecoderTraits(...))`.
"""

from distill_jax.models.model import (DECODER_FAMILIES, ENCODER_FAMILIES, FAMILIES, Model, check_task,
                                      family_module, init_params, load_config, load_model, logical_axes,
                                      model_from_config)
from distill_jax.models.outputs import LM_TASKS, OUTPUT_NAMES, POOLINGS, TASKS, ModelOutputs, pool
from distill_jax.models.students import LAYER_STRATEGIES, check_vocab, init_student, layer_map, student_config

__all__ = [
    "DECODER_FAMILIES", "ENCODER_FAMILIES", "FAMILIES", "LAYER_STRATEGIES", "LM_TASKS", "Model", "ModelOutputs",
    "OUTPUT_NAMES", "POOLINGS", "TASKS", "check_task", "check_vocab", "family_module", "init_params",
    "init_student", "layer_map", "load_config", "load_model", "logical_axes", "model_from_config", "pool",
    "student_config",
]

