"""Mail data types shared by every layer: messages, addresses, SMTP errors.

A library: nothing here imports server configuration or the runtime.
"""
