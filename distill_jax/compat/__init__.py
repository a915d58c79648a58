"""Third-party glue: every line that touches `transformers` lives in `compat.hf`."""
