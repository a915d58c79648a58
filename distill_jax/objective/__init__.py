"""The objective layer: terms.py is the home of a loss term (registry, schema, defaults, schedules); objective.py binds resolved terms to models and computes them."""
