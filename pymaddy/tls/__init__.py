"""TLS: the `tls` / `tls_client` directives and certificate loaders."""
