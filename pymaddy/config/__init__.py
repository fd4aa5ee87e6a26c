"""The maddy configuration language: lexing, parsing and expansion into IR nodes.

Nothing here knows about modules; `pymaddy.compiler` gives the nodes meaning.
"""

from pymaddy.config.errors import ConfigError, ErrorList
from pymaddy.config.ir import Node

__all__ = ["ConfigError", "ErrorList", "Node"]
