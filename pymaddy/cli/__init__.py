"""The `pymaddy` / `maddy` command line."""
