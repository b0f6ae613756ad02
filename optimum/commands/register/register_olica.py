"""Registers ``optimum-cli olica`` with optimum's command line (optimum 2.x register-file discovery).

``optimum-cli`` imports every ``*.py`` file in the ``optimum.commands.register`` namespace package at each start and
reads its ``REGISTER_COMMANDS``. ``optimum``, ``optimum/commands`` and ``optimum/commands/register`` are PEP 420
namespace folders here: they must hold no ``__init__.py``, or they would shadow optimum's own.

Importing ``optimum_olica`` loads torch and transformers (the package registers its pruned architectures with
transformers' Auto classes on import), which takes seconds. This file is imported by every ``optimum-cli`` call,
``optimum-cli export ...`` included, so it imports the real commands only when the command line asks for ``olica``;
otherwise it registers a stand-in with the same name and help text, which is all ``optimum-cli --help`` shows.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

OLICA_COMMAND_NAME = "olica"
OLICA_COMMAND_HELP = "Olica structured pruning: prune, evaluate, inspect and export causal LMs (optimum-olica)."


def _olica_requested(argv: list[str]) -> bool:
    # optimum-cli's root parser has no options of its own besides -h, so the command name is always argv[1].
    return len(argv) > 1 and argv[1] == OLICA_COMMAND_NAME


if _olica_requested(sys.argv):
    from optimum_olica.commands import OlicaCommand
else:

    class OlicaCommand(BaseOptimumCLICommand):
        """Stand-in listed by ``optimum-cli --help``; ``optimum-cli olica ...`` registers the real command."""

        COMMAND = CommandInfo(name=OLICA_COMMAND_NAME, help=OLICA_COMMAND_HELP)


REGISTER_COMMANDS = [OlicaCommand]
