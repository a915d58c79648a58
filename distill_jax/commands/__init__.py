"""One module per CLI command; distill_jax.cli only parses and dispatches here."""
