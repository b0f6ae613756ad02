"""``optimum-cli olica prune MODEL OUTPUT``: `OlicaPruner.from_pretrained`, `prune`, and optionally `push_to_hub`.

The recipe flags are generated from `OlicaConfig`'s dataclass fields: one flag per field, named after it
(``num_calibrated_layers`` -> ``--num-calibrated-layers``; ``calibration_source`` is ``--dataset``, as in optimum's
other commands), with the field's ``help`` metadata and default. A flag left out leaves the field at its default, so
the config class stays the single source of defaults and validation, and a field added to it gets its flag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types
import typing
from typing import Any, Literal

from ..configuration import OlicaConfig
from .base import OlicaSubcommand, add_model_loading_arguments, load_tokenizer_first, model_loading_kwargs

__all__ = ["OlicaPruneCommand", "config_flag_name", "recipe_from_args"]

# Fields whose flag is not "--" + the field name with dashes, and their value's name in the help.
_FLAG_NAMES = {"calibration_source": "--dataset"}
_METAVARS = {"calibration_source": "SOURCE"}
# Fields that are not choices of a run: the file format version is written by save_pretrained.
_NOT_FLAGS = {"format_version"}
# Fields shown in the "Calibration data" group rather than "Recipe".
_CALIBRATION_FIELDS = ("calibration_source", "num_samples", "sequence_length", "seed", "self_calibration")


def config_flag_name(field_name: str) -> str:
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _layer_list(text: str) -> list[int]:
    """``"0,1,31"`` -> ``[0, 1, 31]`` (commas, so the list cannot swallow the positional arguments)."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,1,31, got {text!r}")


def _union_parser(members: tuple, allows_none: bool):
    """A value of a union type such as ``float | str | None``: a number when it reads as one, ``none`` for None,
    else the string (the config validates which strings it accepts)."""

    def parse(text: str) -> Any:
        if allows_none and text.lower() == "none":
            return None
        for member in (int, float):
            if member in members:
                try:
                    return member(text)
                except ValueError:
                    pass
        if str in members:
            return text
        raise argparse.ArgumentTypeError(f"expected {' or '.join(m.__name__ for m in members)}, got {text!r}")

    parse.__name__ = "|".join(m.__name__ for m in members) + ("|none" if allows_none else "")
    return parse


def _argument_spec(config_field: dataclasses.Field, annotation: Any) -> dict:
    """argparse keyword arguments for one OlicaConfig field."""
    default = (
        config_field.default_factory() if config_field.default is dataclasses.MISSING else config_field.default
    )
    help_text = config_field.metadata.get("help", "")
    spec: dict[str, Any] = {"dest": config_field.name, "default": argparse.SUPPRESS}
    if typing.get_origin(annotation) is Literal:
        spec["choices"] = typing.get_args(annotation)
    elif annotation is bool:
        # A field that defaults to True would need a way to turn it off: --x / --no-x.
        spec["action"] = argparse.BooleanOptionalAction if default else "store_true"
        return {**spec, "help": help_text}
    elif typing.get_origin(annotation) is list:
        spec.update(type=_layer_list, metavar="I,J,...")
        default = ",".join(str(index) for index in default) or "none"
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = tuple(member for member in typing.get_args(annotation) if member is not type(None))
        allows_none = len(members) < len(typing.get_args(annotation))
        spec["type"] = members[0] if len(members) == 1 else _union_parser(members, allows_none)
        if len(members) > 1:
            spec["metavar"] = spec["type"].__name__.upper()
    else:
        spec["type"] = annotation
    if config_field.name in _METAVARS:
        spec["metavar"] = _METAVARS[config_field.name]
    return {**spec, "help": f"{help_text} (default: {default})"}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(OlicaConfig)
    calibration = parser.add_argument_group("Calibration data (OlicaConfig fields)")
    recipe = parser.add_argument_group("Recipe (OlicaConfig fields)")
    for config_field in dataclasses.fields(OlicaConfig):
        if config_field.name in _NOT_FLAGS:
            continue
        group = calibration if config_field.name in _CALIBRATION_FIELDS else recipe
        spec = _argument_spec(config_field, hints[config_field.name])
        group.add_argument(config_flag_name(config_field.name), **spec)
    # Not a recipe field: how to read one kind of source (OlicaPruner.prune's text_column), recorded in the report.
    calibration.add_argument(
        "--text-column",
        metavar="NAME",
        default=None,
        help="Column holding the text of a .json/.jsonl/.parquet/.csv or Hub dataset source (default: 'text', else "
        "the only string column).",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the run happens: arguments of the run (OlicaPruner.from_pretrained / prune), not saved with the recipe."""
    run = parser.add_argument_group("Run (not saved with the recipe)")
    run.add_argument(
        "--device",
        default=None,
        help="Compute device of the layer-by-layer pass, e.g. 'cpu', 'cuda', 'cuda:1' (default: 'cuda' if available, "
        "else 'cpu'). OlicaPruner.prune(device=...).",
    )
    run.add_argument(
        "--offload-activations",
        action="store_true",
        help="Keep the calibration activations on the CPU between layers (less accelerator memory, the same "
        "weights). OlicaPruner.prune(offload_activations=True).",
    )
    run.add_argument(
        "--streaming",
        action="store_true",
        help="Read one decoder layer at a time from MODEL's safetensors files instead of loading the model, and "
        "write each pruned layer to OUTPUT at once (for models larger than memory). "
        "OlicaPruner.from_pretrained(MODEL, streaming=True).",
    )


@contextlib.contextmanager
def _text_column_as_flag():
    """Says ``--text-column NAME`` where the Python API's message says ``text_column=NAME``."""
    from ..data import TextColumnError
    from ..errors import CalibrationDataError

    try:
        yield
    except TextColumnError as error:
        raise CalibrationDataError(error.message_for("--text-column ")) from None


def _model_config(model: str, loading: dict, ratio: float, *, required: bool):
    """MODEL's config alone (no tokenizer, no weights); an Olica checkpoint is refused from it.

    Args:
        required: without it, an unreadable config gives None: the loading steps that follow report it in their
            own terms.
    """
    from ..loading import check_model_location, load_config
    from ..pruner import refuse_pruned_model

    check_model_location(model)
    try:
        model_config = load_config(model, loading)
    except (OSError, ValueError):
        if required:
            raise
        return None
    refuse_pruned_model(model_config, ratio)
    return model_config


def _memory_plan(args: argparse.Namespace, config: OlicaConfig):
    """The plan of ``--dry-run``, from MODEL's config alone (`optimum_olica.memory_plan.plan_memory`)."""
    from ..memory_plan import plan_memory

    model_config = _model_config(args.model, model_loading_kwargs(args), config.ratio, required=True)
    dtype = None if args.dtype in (None, "auto") else args.dtype
    return plan_memory(
        model_config, config, dtype=dtype, device=args.device, streaming=args.streaming,
        offload_activations=args.offload_activations,
    )


def recipe_from_args(args: argparse.Namespace) -> OlicaConfig:
    """The `OlicaConfig` the flags describe (fields whose flag was not given keep their defaults)."""
    given = {
        config_field.name: getattr(args, config_field.name)
        for config_field in dataclasses.fields(OlicaConfig)
        if hasattr(args, config_field.name)
    }
    return OlicaConfig(**given)


class OlicaPruneCommand(OlicaSubcommand):
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="Hub id or local folder of the causal LM to prune.")
        parser.add_argument(
            "output", metavar="OUTPUT", help="Folder to write the pruned checkpoint to (written atomically)."
        )
        _add_config_arguments(parser)
        _add_run_arguments(parser)
        add_model_loading_arguments(parser)
        output = parser.add_argument_group("Output")
        output.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists and is not empty.")
        output.add_argument(
            "--checkpoint-dir",
            default=None,
            help="Save progress there after each layer; rerunning the same command resumes after the last finished "
            "layer with a bit-identical result; a rerun with other arguments is refused. The folder's resume files "
            "are deleted once OUTPUT is written and verified.",
        )
        output.add_argument(
            "--dry-run",
            action="store_true",
            help="Read only MODEL's config.json and print the memory plan: per phase, the bytes the run will hold on "
            "the compute device and on the host, the disk it will write and a time estimate. Loads no weight and "
            "writes nothing.",
        )
        output.add_argument(
            "--push-to-hub",
            metavar="REPO_ID",
            default=None,
            help="Upload OUTPUT with a model card to this Hub repository (created if missing) after pruning. Needs "
            "a token: `hf auth login` or HF_TOKEN.",
        )
        output.add_argument(
            "--private", action="store_true", help="With --push-to-hub: create the repository as private."
        )
        output.add_argument(
            "--base-model",
            metavar="HUB_ID",
            default=None,
            help="With --push-to-hub: the base model's Hub id for the model card, when MODEL is a local folder "
            "(default: MODEL when it is a Hub id).",
        )

    def execute(self) -> None:
        from ..atomic_io import prepare_output_directory
        from ..data import load_calibration_texts
        from ..pruner import OlicaPruner

        args = self.args
        for flag, value in (("--private", args.private), ("--base-model", args.base_model)):
            if value and not args.push_to_hub:
                raise ValueError(f"{flag} only applies with --push-to-hub REPO_ID; add it or drop {flag}.")
        config = recipe_from_args(args)
        if args.dry_run:
            print(_memory_plan(args, config))
            return
        # Fail on a bad OUTPUT or a missing Hub token before loading a model and pruning, which can take hours.
        prepare_output_directory(args.output, args.overwrite)
        if args.push_to_hub:
            from ..hub import require_token

            require_token(args.push_to_hub, consequence="Nothing was pruned.")
        loading = model_loading_kwargs(args)
        _model_config(args.model, loading, config.ratio, required=False)
        # The tokenizer and the calibration text before the model, which can take minutes to load: a missing
        # tokenizer or an unreadable source fails in seconds.
        tokenizer = load_tokenizer_first(args, loading, "the calibration text")
        with _text_column_as_flag():
            load_calibration_texts(config.calibration_source, text_column=args.text_column)
            pruner = OlicaPruner.from_pretrained(args.model, tokenizer, streaming=args.streaming, **loading)
            pruner.prune(
                config, save_directory=args.output, overwrite=args.overwrite, checkpoint_dir=args.checkpoint_dir,
                text_column=args.text_column, device=args.device, offload_activations=args.offload_activations,
            )
        print(f"Pruned checkpoint written to {pruner.saved_directory}")
        if args.push_to_hub:
            url = pruner.push_to_hub(
                args.push_to_hub, private=True if args.private else None, base_model=args.base_model
            )
            print(f"Uploaded to {url}")
