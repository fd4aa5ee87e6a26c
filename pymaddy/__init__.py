"""pymaddy: a composable all-in-one mail server, configured by maddy.conf."""

__version__ = "0.1.0"
MADDY_COMPAT = "0.9.4"
