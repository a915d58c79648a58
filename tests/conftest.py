"""Shared pytest set-up: forced host devices before jax is imported, offline HF, helpers on path."""

import atexit
import os
import shutil
import sys
import tempfile

# Multi-device code is tested on CPU with forced host devices; this must precede `import jax`.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests' programs are tiny: compiling them, not running them, is most of the suite's time,
# and most of a compile is LLVM optimizing the CPU kernels.  Level 0 skips that (XLA's own HLO
# passes, fusion included, still run; floating point stays IEEE, as at the default level):
# test_objective_reference.py's encoder test 34 -> 16 s.  An explicit level in XLA_FLAGS wins.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache per test session, shared with the CLI/multi-process tests'
# subprocesses (they inherit the environment): a program that another test already compiled
# (the same tiny model's step, eval or generate, or a small op) is loaded instead of compiled
# again.  XLA compilation is most of the suite's time (1060 of 1307 s wall in
# tests/test_step.py, 151 compiles); in test_step_update.py + test_generate.py 47 of 235
# compiles were repeats served by this cache.  A size limit turns on the cache's file lock, so
# concurrent processes never read a half-written entry.  Per session, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="distill_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

sys.path.insert(0, os.path.dirname(__file__))
