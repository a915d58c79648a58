"""Evaluation: teacher-agreement metrics, efficiency (params, latency, throughput) and the before/after report."""
