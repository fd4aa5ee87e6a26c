"""From IR nodes to a validated graph of module instances."""

from pymaddy.compiler.compile import CompileResult, compile_file, compile_loaded
from pymaddy.compiler.graph import Graph, ModuleInstance

__all__ = ["CompileResult", "Graph", "ModuleInstance", "compile_file", "compile_loaded"]
