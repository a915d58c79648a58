"""The data layer: sources (files, hub, streaming), the tokenizing/packing pipeline, Grain per-host batches, the teacher-cache reader and its codec."""
