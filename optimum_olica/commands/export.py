"""``optimum-cli olica export CHECKPOINT OUTPUT --format stock|gguf``: `optimum_olica.export_to_stock` or
`optimum_olica.export_to_gguf`, then the parameter counts (and, for GGUF, the file size) of what was written."""

from __future__ import annotations

import argparse

from .base import OlicaSubcommand

__all__ = ["OlicaExportCommand"]

EXPORT_FORMATS = ("stock", "gguf")
GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_k_m")  # optimum_olica.gguf_export.QUANTIZATIONS, without importing it


class OlicaExportCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", metavar="CHECKPOINT", help="A local Olica checkpoint folder.")
        parser.add_argument(
            "output", metavar="OUTPUT",
            help="Folder to write the stock checkpoint to; for --format gguf, the .gguf file to write.",
        )
        parser.add_argument(
            "--format",
            choices=EXPORT_FORMATS,
            default="stock",
            help="stock: the base family's own architecture (e.g. LlamaForCausalLM), exact, loadable without the "
            "plugin or trust_remote_code. gguf: one file for llama.cpp, tokenizer included (default: stock).",
        )
        parser.add_argument(
            "--quantize",
            choices=GGUF_QUANTIZATIONS,
            default=None,
            help="--format gguf only: the weights' type (default: f16). q4_k_m is made by llama.cpp's own "
            "quantizer and needs llama-cpp-python (pip install 'optimum-olica[llamacpp]').",
        )
        parser.add_argument(
            "--tokenizer-pre",
            default=None,
            metavar="NAME",
            help="--format gguf only: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), for tokenizers whose "
            "splitting the export does not recognise (e.g. llama-bpe, qwen2).",
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty."
        )

    def execute(self) -> None:
        args = self.args
        if args.format == "gguf":
            from ..gguf_export import export_to_gguf

            result = export_to_gguf(
                args.checkpoint, args.output, args.quantize or "f16", tokenizer_pre=args.tokenizer_pre,
                overwrite=args.overwrite,
            )
            print(result.summary())
            return
        if args.quantize is not None or args.tokenizer_pre is not None:
            raise ValueError("--quantize and --tokenizer-pre apply to --format gguf only; the stock export is the "
                             "checkpoint's own weights, unquantized.")
        from ..export import export_to_stock

        print(export_to_stock(args.checkpoint, args.output, overwrite=args.overwrite).summary())
