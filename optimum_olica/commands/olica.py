"""The ``olica`` command of ``optimum-cli`` and an in-process entry point with the same parser.

optimum-cli finds `OlicaCommand` through ``optimum/commands/register/register_olica.py``. `main` builds the same
command line without going through optimum-cli's discovery, for ``python -m optimum_olica.commands`` and for tests
that run the CLI in-process.
"""

from __future__ import annotations

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo, RootOptimumCLICommand

from .evaluate import OlicaEvalCommand
from .export import OlicaExportCommand
from .inspect_checkpoint import OlicaInspectCommand
from .prune import OlicaPruneCommand

__all__ = ["OlicaCommand", "main"]


class OlicaCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="olica", help="Olica structured pruning: prune, evaluate, inspect and export causal LMs (optimum-olica)."
    )
    SUBCOMMANDS = (
        CommandInfo(
            name="prune",
            help="Prune a causal LM with Olica and save the checkpoint (optionally upload it to the Hub).",
            subcommand_class=OlicaPruneCommand,
        ),
        CommandInfo(
            name="eval",
            help="Perplexity on a held-out text and, with --tasks, zero-shot accuracy (lm-evaluation-harness).",
            subcommand_class=OlicaEvalCommand,
        ),
        CommandInfo(
            name="inspect",
            help="Show a pruned checkpoint: per-layer dimensions, parameters, recipe, calibration data, figures.",
            subcommand_class=OlicaInspectCommand,
        ),
        CommandInfo(
            name="export",
            help="Export a pruned checkpoint to its base family's stock architecture (exact; loads without the "
            "plugin).",
            subcommand_class=OlicaExportCommand,
        ),
    )


def main(argv: list[str] | None = None) -> None:
    """Runs ``optimum-cli olica <argv>`` in this process (``argv`` without the leading ``olica``; default: the
    process's arguments).

    Exits like optimum-cli: returns normally on success, raises ``SystemExit`` otherwise.
    """
    root = RootOptimumCLICommand("optimum-cli", usage="optimum-cli")
    root.register_subcommand(CommandInfo(OlicaCommand.COMMAND.name, OlicaCommand.COMMAND.help, OlicaCommand))
    args = root.parser.parse_args(["olica", *(sys.argv[1:] if argv is None else argv)])
    args.func(args).run()
