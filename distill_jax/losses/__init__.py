"""The public loss API: pure, unreduced, float32, mask-aware distillation losses.

Three families (logits, features, relations), every token-level logit loss chunked from hidden
states and unembeddings (never materializing `[tokens, V]`), and the
masked reductions that turn unreduced values into a scalar or a ``(sum, count)`` metric.

Hyperparameters given as Python numbers (``temperature``, ``beta``, ``skew``,
``label_smoothing``, ``chunk_size``, ``num_heads``, ``kind``, ...) are validated with a
one-line ``ValueError`` naming the argument and the allowed range.  Traced (jax array)
values cannot be checked at trace time and are not; for every valid value they give the
same result as the equal Python number.
"""

from __future__ import annotations

from distill_jax.losses._cross_tokenizer import chunked_hybrid_uld
from distill_jax.losses._cross_tokenizer import chunked_uld
from distill_jax.losses._cross_tokenizer import hybrid_uld
from distill_jax.losses._cross_tokenizer import span_gather
from distill_jax.losses._cross_tokenizer import span_log_probs
from distill_jax.losses._cross_tokenizer import span_mean
from distill_jax.losses._cross_tokenizer import span_sum
from distill_jax.losses._cross_tokenizer import uld
from distill_jax.losses._feature import attention_kl
from distill_jax.losses._feature import attention_mse
from distill_jax.losses._feature import cosine_distance
from distill_jax.losses._feature import hidden_mse
from distill_jax.losses._feature import value_relation_kl
from distill_jax.losses._logit import cross_entropy
from distill_jax.losses._logit import forward_kl
from distill_jax.losses._logit import generalized_jsd
from distill_jax.losses._logit import reverse_kl
from distill_jax.losses._logit import skew_kl
from distill_jax.losses._logit import skew_reverse_kl
from distill_jax.losses._logit import total_variation
from distill_jax.losses._reduce import masked_mean
from distill_jax.losses._reduce import masked_sum_and_count
from distill_jax.losses._relation import relation_matrix
from distill_jax.losses._relation import rkd_angle
from distill_jax.losses._relation import rkd_distance
from distill_jax.losses._relation import similarity_preserving
from distill_jax.losses._relation import token_relation
from distill_jax.losses._sparse import chunked_sparse_forward_kl
from distill_jax.losses._sparse import chunked_sparse_generalized_jsd
from distill_jax.losses._sparse import chunked_sparse_reverse_kl
from distill_jax.losses._sparse import chunked_top_k_teacher
from distill_jax.losses._sparse import sparse_forward_kl
from distill_jax.losses._sparse import sparse_generalized_jsd
from distill_jax.losses._sparse import sparse_reverse_kl
from distill_jax.losses._sparse import teacher_top_k
from distill_jax.losses._sparse_cross_tokenizer import chunked_sparse_hybrid_uld
from distill_jax.losses._sparse_cross_tokenizer import chunked_sparse_uld
from distill_jax.losses._sparse_cross_tokenizer import sparse_hybrid_uld
from distill_jax.losses._sparse_cross_tokenizer import sparse_uld
from distill_jax.losses._vocab import DEFAULT_CHUNK_SIZE
from distill_jax.losses._vocab import chunked_argmax
from distill_jax.losses._vocab import chunked_cross_entropy
from distill_jax.losses._vocab import chunked_ensemble_kl
from distill_jax.losses._vocab import chunked_forward_kl
from distill_jax.losses._vocab import chunked_generalized_jsd
from distill_jax.losses._vocab import chunked_reverse_kl
from distill_jax.losses._vocab import chunked_skew_kl
from distill_jax.losses._vocab import chunked_skew_reverse_kl
from distill_jax.losses._vocab import chunked_total_variation

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "attention_kl",
    "attention_mse",
    "chunked_argmax",
    "chunked_cross_entropy",
    "chunked_ensemble_kl",
    "chunked_forward_kl",
    "chunked_generalized_jsd",
    "chunked_hybrid_uld",
    "chunked_reverse_kl",
    "chunked_skew_kl",
    "chunked_skew_reverse_kl",
    "chunked_sparse_forward_kl",
    "chunked_sparse_generalized_jsd",
    "chunked_sparse_hybrid_uld",
    "chunked_sparse_reverse_kl",
    "chunked_sparse_uld",
    "chunked_top_k_teacher",
    "chunked_total_variation",
    "chunked_uld",
    "cosine_distance",
    "cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "hidden_mse",
    "hybrid_uld",
    "masked_mean",
    "masked_sum_and_count",
    "relation_matrix",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "skew_kl",
    "skew_reverse_kl",
    "span_gather",
    "span_log_probs",
    "span_mean",
    "span_sum",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_hybrid_uld",
    "sparse_reverse_kl",
    "sparse_uld",
    "teacher_top_k",
    "token_relation",
    "total_variation",
    "uld",
    "value_relation_kl",
]
