"""SMTP, submission and LMTP endpoints: an own protocol implementation on asyncio streams."""

from pymaddy.endpoints.smtp.endpoint import SMTPEndpoint

__all__ = ["SMTPEndpoint"]
