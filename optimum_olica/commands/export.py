"""``optimum-cli olica export CHECKPOINT OUTPUT --format stock``: `optimum_olica.export_to_stock`, then the parameter
counts of the Olica checkpoint and of the export."""

from __future__ import annotations

import argparse

from .base import OlicaSubcommand

__all__ = ["OlicaExportCommand"]

EXPORT_FORMATS = ("stock",)


class OlicaExportCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", metavar="CHECKPOINT", help="A local Olica checkpoint folder.")
        parser.add_argument("output", metavar="OUTPUT", help="Folder to write the exported checkpoint to.")
        parser.add_argument(
            "--format",
            choices=EXPORT_FORMATS,
            default="stock",
            help="stock: the base family's own architecture (e.g. LlamaForCausalLM), exact, loadable without the "
            "plugin or trust_remote_code (default: stock).",
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty."
        )

    def execute(self) -> None:
        from ..export import export_to_stock

        print(export_to_stock(self.args.checkpoint, self.args.output, overwrite=self.args.overwrite).summary())
