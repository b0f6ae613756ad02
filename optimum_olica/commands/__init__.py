"""The ``optimum-cli olica`` commands (prune, eval, inspect, export): argument parsing and a ``run()`` calling the
Python API.

Registered with optimum-cli by ``optimum/commands/register/register_olica.py``; `main` runs the same command line
in-process (``python -m optimum_olica.commands prune ...``).
"""

from .olica import OlicaCommand, main

__all__ = ["OlicaCommand", "main"]
