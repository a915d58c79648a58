"""Checkpointing: the Orbax manager, integrity records, preemption (SIGTERM saves), atomic export of the student."""
