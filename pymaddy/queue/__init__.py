"""target.queue: a persistent, crash-safe delivery queue with retries and DSNs (spec §E)."""
