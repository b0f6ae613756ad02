"""``optimum-cli olica inspect DIR``: what a pruned checkpoint is and how it was made (`describe_checkpoint`)."""

from __future__ import annotations

import argparse

from .base import OlicaSubcommand

__all__ = ["OlicaInspectCommand"]


class OlicaInspectCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "directory", metavar="DIR", help="A checkpoint folder written by `optimum-cli olica prune`."
        )

    def execute(self) -> None:
        from ..inspection import OlicaCheckpoint, describe_checkpoint

        print(describe_checkpoint(OlicaCheckpoint.from_directory(self.args.directory)))
