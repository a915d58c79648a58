"""The config layer: pydantic sections, the root Config, YAML loading and dotted overrides (one-line errors naming fields)."""
