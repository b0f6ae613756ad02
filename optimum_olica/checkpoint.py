"""Moving models between the stock and the Olica architectures, and writing pruned checkpoints safely."""

from __future__ import annotations

import copy
import ctypes
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PreTrainedModel

from ._faults import fault_point
from .errors import OlicaError
from .export import stock_state_dict
from .integrity import verify_saved_checkpoint
from .modeling import OLICA_CONFIG_FOR_BASE_MODEL_TYPE, OLICA_MODEL_CLASSES, OlicaDimensionsMixin

logger = logging.getLogger(__name__)


SUPPORTED_MODEL_TYPES = tuple(OLICA_CONFIG_FOR_BASE_MODEL_TYPE)


class UnsupportedArchitectureError(OlicaError):
    """The model's family has no Olica architecture."""


def olica_config_class_for(config) -> type:
    """The Olica config class for a stock (or already Olica) transformers config."""
    if isinstance(config, OlicaDimensionsMixin):
        return type(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in OLICA_CONFIG_FOR_BASE_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"Olica does not support model_type={model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}). "
            f"Supported families: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return OLICA_CONFIG_FOR_BASE_MODEL_TYPE[model_type]


def olica_config_from(config, **dimensions):
    """The Olica config of a stock config with the given per-layer dimensions (full dimensions by default)."""
    # from_base_config copies every field but the model identity, so it also re-dimensions an Olica config.
    return olica_config_class_for(config).from_base_config(config, **dimensions)


def causal_lm_class_for(olica_config) -> type[PreTrainedModel]:
    return OLICA_MODEL_CLASSES[type(olica_config)][1]


def build_olica_model(olica_config, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """An Olica causal LM holding exactly the tensors of ``state_dict`` (no copy, no random initialisation)."""
    with init_empty_weights():
        model = causal_lm_class_for(olica_config)(olica_config)
    _load_state_dict_exactly(model, state_dict)
    return model.eval()


def convert_to_olica(model: PreTrainedModel) -> PreTrainedModel:
    """The Olica architecture at full dimensions holding the same weights: computes the same function."""
    olica_config = olica_config_from(model.config)
    olica_config._attn_implementation = model.config._attn_implementation
    return build_olica_model(olica_config, model.state_dict())


def to_stock_model(model: PreTrainedModel) -> PreTrainedModel:
    """The stock architecture (e.g. ``LlamaForCausalLM``) computing the same function as an Olica model.

    Factored Q/K are multiplied back into dense weights and narrow value heads zero-padded to ``head_dim``
    (`optimum_olica.export.stock_state_dict`), so the stock model has more parameters than the Olica one when either
    is used; every other tensor is shared, not copied. The generation config is carried over.

    Raises:
        ValueError: naming the layers, if the model has FFN widths that differ between layers or a linear-calibration
            branch, which no stock config can express.
    """
    stock_config = model.config.to_base_config()
    stock_config._attn_implementation = model.config._attn_implementation
    with init_empty_weights():
        stock = AutoModelForCausalLM.from_config(stock_config)
    _load_state_dict_exactly(stock, stock_state_dict(model.state_dict(), model.config))
    stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.eval()


def _load_state_dict_exactly(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


STAGING_PREFIX = ".olica-tmp-"  # a directory being written; never a valid checkpoint until renamed
RETIRED_PREFIX = ".olica-old-"  # the previous target, moved aside while the new one takes its place


def prepare_output_directory(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """Check the target before any work is done, so a bad path fails in seconds, not after pruning.

    Also tidies what an interrupted earlier write of the same target left beside it (see
    ``clean_interrupted_writes``).
    """
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {target} exists and is a file; choose a directory path.")
    parent = target.parent
    existing = next((path for path in (parent, *parent.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"Output path {target} is inside {existing}, which is a file; choose a directory path.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(
            f"Cannot create the parent folder {parent} of the output directory (permission denied); choose a "
            "writable output directory."
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write to {parent}; choose a writable output directory.")
    clean_interrupted_writes(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {target} is not empty; choose another path or pass overwrite=True (--overwrite)."
        )
    return target


def _owner_is_gone(path: Path, prefix: str, target: Path) -> bool:
    """Whether the process that made a staging/retired folder of ``target`` (named ``<prefix><target>-<pid>-<random>``)
    no longer runs. False for a folder of another target whose name merely starts like this one (``out-2``)."""
    # mkdtemp's random suffix has no '-', so the pid is the last-but-one field after the exact target name.
    match = re.fullmatch(r"(\d+)-[A-Za-z0-9_]+", path.name[len(prefix) + len(target.name) + 1 :])
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # ours: a write of this process cleans up after itself
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def clean_interrupted_writes(target: str | os.PathLike) -> None:
    """Remove the staging folders of writes of ``target`` whose process died (a kill, a crash, a power loss), and
    put back a previous ``target`` that such a write had moved aside but not yet replaced."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = glob.escape(target.name)
    for retired in sorted(target.parent.glob(f"{RETIRED_PREFIX}{pattern}-*")):
        if not _owner_is_gone(retired, RETIRED_PREFIX, target):
            continue
        previous = retired / target.name
        if previous.is_dir() and not target.exists():
            os.replace(previous, target)
            logger.warning("Restored %s, which an interrupted write had moved aside.", target)
        shutil.rmtree(retired, ignore_errors=True)
    for staging in target.parent.glob(f"{STAGING_PREFIX}{pattern}-*"):
        if _owner_is_gone(staging, STAGING_PREFIX, target):
            shutil.rmtree(staging, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_current_directory, rename_exchange = -100, 2
    return renameat2(at_current_directory, os.fsencode(first), at_current_directory, os.fsencode(second),
                     rename_exchange) == 0


def _fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory`` to disk, so the rename publishes complete files."""
    if os.name != "posix":
        return
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_directory_atomically(
    save_directory: str | os.PathLike, write, overwrite: bool = False, verify=None
) -> Path:
    """Run ``write(tmp_dir)`` in a temporary directory beside the target, verify it, then move it into place.

    The temporary directory is named ``.olica-tmp-<target>-<pid>-<random>``; if this process is killed, the next
    write of the same target removes it. A crash, a full disk, an exception inside ``write`` or a failed ``verify``
    leaves the target as it was; an existing non-empty target is replaced only with ``overwrite=True``, and only
    once the new directory is complete (in one atomic exchange where the OS offers it).

    Args:
        save_directory: the target directory.
        write: ``write(staging: Path)`` fills the staging directory.
        overwrite: replace an existing non-empty target.
        verify: ``verify(staging: Path)`` raises if the staging directory is not a complete checkpoint.
    """
    target = prepare_output_directory(save_directory, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        write(staging)
        fault_point("output_written")
        if verify is not None:
            verify(staging)
        _fsync_tree(staging)
        fault_point("output_before_rename")
        if target.exists() and _exchange(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous target
        elif target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{target.name}-{os.getpid()}-", dir=target.parent))
            os.replace(target, retired / target.name)
            try:
                fault_point("output_between_renames")
                os.replace(staging, target)
            except BaseException:
                os.replace(retired / target.name, target)
                shutil.rmtree(retired, ignore_errors=True)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_pruned_model(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_size: str | int = "5GB",
    prefer_stock: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    expected_parameters: int | None = None,
) -> Path:
    """Write a pruned model as a safetensors checkpoint that reloads with ``from_pretrained``.

    When ``prefer_stock`` and the pruned model is expressible in the base architecture (uniform FFN width, nothing
    factored, full value heads, no calibration branch), it is saved as the stock family (e.g. a ``LlamaConfig`` with a
    smaller ``intermediate_size``) so any engine that reads stock checkpoints can serve it. Otherwise it is saved as
    the Olica architecture with its modeling code beside the weights (``trust_remote_code`` loading).

    Args:
        model: an Olica causal LM.
        save_directory: target directory, written atomically.
        tokenizer: saved beside the weights when given.
        max_shard_size: passed to ``save_pretrained``.
        prefer_stock: save stock-representable models as the stock architecture.
        overwrite: replace an existing non-empty directory.
        extra_files: ``{file name: text}`` written beside the weights (recipe, report, model card).
        expected_parameters: the parameter count the written checkpoint must have (default: the model's own count);
            checked, with the safetensors headers against the architecture, before the directory is moved into place.
    """
    to_save = model
    if prefer_stock and isinstance(model.config, OlicaDimensionsMixin) and not model.config.stock_incompatibilities():
        to_save = to_stock_model(model)

    def write(directory: Path) -> None:
        to_save.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text, encoding="utf-8")

    expected = model.num_parameters() if expected_parameters is None else expected_parameters
    return write_directory_atomically(
        save_directory, write, overwrite=overwrite, verify=lambda staging: verify_saved_checkpoint(staging, expected)
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedArchitectureError",
    "build_olica_model",
    "clean_interrupted_writes",
    "causal_lm_class_for",
    "convert_to_olica",
    "olica_config_class_for",
    "olica_config_from",
    "prepare_output_directory",
    "save_pruned_model",
    "to_stock_model",
    "verify_saved_checkpoint",
    "write_directory_atomically",
]
