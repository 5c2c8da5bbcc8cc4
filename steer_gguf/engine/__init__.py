"""The runtime: the patched library, contexts and their steering tables, SteeredLlama,
routing records, per-sequence slots, the batch engine, and teacher-forced scoring."""
