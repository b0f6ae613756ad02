"""What every ``optimum-cli olica`` subcommand shares: ``--verbose``, error reporting and exit codes.

optimum's ``main()`` calls ``run()`` and ignores what it returns, so a failure must leave through ``SystemExit``:
0 on success; 1 with a one-line ``error:`` message on stderr for a problem with the input (our API raises
``ValueError``/``OlicaError``, ``OSError`` such as ``FileNotFoundError``, ``RuntimeError``, or ``ImportError`` for a
missing extra); 130 when interrupted; 0, quietly, when the reader of stdout goes away (``| head``).
``--verbose`` re-raises instead, with the traceback, and turns on the package's INFO logging. Anything else (a bug)
keeps its traceback. argparse reports bad flags itself (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from optimum.commands.base import BaseOptimumCLICommand

__all__ = [
    "EXPECTED_ERRORS",
    "OlicaSubcommand",
    "add_model_loading_arguments",
    "load_tokenizer_first",
    "model_loading_kwargs",
]

# The exception types our API raises about its inputs, files and environment (see the module docstring).
EXPECTED_ERRORS = (ValueError, OSError, RuntimeError, ImportError)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_model_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``from_pretrained`` arguments shared by prune and eval."""
    group = parser.add_argument_group("Model loading (from_pretrained arguments)")
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="Dtype to load the model in; pruning keeps it (default: auto, the checkpoint's own dtype).",
    )
    group.add_argument(
        "--device-map",
        default=None,
        help="accelerate device map, e.g. 'auto' (spread over the GPUs, then CPU and disk) or 'cpu'.",
    )
    group.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub model.")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow modeling code stored with the model (not needed for Olica checkpoints: the CLI registers the "
        "pruned architectures itself).",
    )
    group.add_argument(
        "--tokenizer",
        metavar="FOLDER_OR_HUB_ID",
        default=None,
        help="Where to load the tokenizer from when MODEL has none (default: MODEL).",
    )


def model_loading_kwargs(args: argparse.Namespace) -> dict:
    """The ``from_pretrained`` keyword arguments the loading flags ask for (unset flags are left to the default)."""
    kwargs = {}
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    if args.revision is not None:
        kwargs["revision"] = args.revision
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return kwargs


def load_tokenizer_first(args: argparse.Namespace, loading: dict, purpose: str):
    """MODEL's tokenizer (or --tokenizer's), loaded before the model so that a missing one fails in seconds.

    Args:
        args: the parsed flags (``model``, ``tokenizer``).
        loading: the model's ``from_pretrained`` keyword arguments (those that locate files also locate the tokenizer).
        purpose: what the tokenizer is for, for the message (``"the calibration text"``).
    """
    from ..loading import TokenizerNotFoundError, check_model_location, load_config, load_tokenizer

    if args.tokenizer is None:
        check_model_location(args.model)
        if not os.path.isdir(os.path.expanduser(args.model)):
            # A Hub id: its config first, so that a model that is not there is reported as such, not as a model
            # without a tokenizer.
            load_config(args.model, loading)
        source, kwargs = args.model, loading
        fix = (
            "pass --tokenizer FOLDER_OR_HUB_ID (the tokenizer of the model these weights come from), or copy its "
            "tokenizer files into the folder"
        )
    else:  # --revision names a revision of MODEL, not of another repository
        source, kwargs = args.tokenizer, {key: value for key, value in loading.items() if key != "revision"}
        fix = "check --tokenizer"
    try:
        return load_tokenizer(source, **kwargs)
    except TokenizerNotFoundError as error:
        raise TokenizerNotFoundError(f"{error}, and {purpose} must be tokenized: {fix}.") from None


class OlicaSubcommand(BaseOptimumCLICommand):
    """Base of the olica subcommands: subclasses define ``add_arguments`` and ``execute``."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    @classmethod
    def parse_args(cls, parser: argparse.ArgumentParser) -> None:  # optimum's name for "declare the arguments"
        cls.add_arguments(parser)
        parser.add_argument(
            "--verbose", action="store_true", help="Show INFO logs, and the full traceback when something fails."
        )

    def execute(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        verbose = getattr(self.args, "verbose", False)
        if verbose:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            logging.getLogger("optimum_olica").setLevel(logging.INFO)
        prog = f"optimum-cli olica {self.COMMAND.name}"
        try:
            self.execute()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): not an error. Point stdout at devnull so the interpreter's final
            # flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except KeyboardInterrupt:
            if verbose:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except EXPECTED_ERRORS as error:
            if verbose:
                raise
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{prog}: error: {message} (--verbose shows the traceback)", file=sys.stderr)
            raise SystemExit(1) from None
