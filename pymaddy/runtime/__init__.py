"""Running a compiled graph: listeners, signals, reload with socket hand-over, logging."""
