"""End-to-end tests: the real server process, driven like a user would."""
