"""IMAP4rev1 protocol library (RFC 3501 and extensions): parsing, formatting, MIME, search, threading.

Nothing here imports server configuration or storage; the endpoint
(pymaddy/endpoints/imap) and the CLI build on it.
"""
