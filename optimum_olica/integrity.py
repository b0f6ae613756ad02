"""Cheap integrity checks of safetensors checkpoints: headers against file sizes, names and shapes against the
architecture, parameter counts against the report. Nothing here reads the weights themselves, so checking a 70B
checkpoint costs the same few milliseconds per file as checking a tiny one (plus building the model on the meta
device).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import CheckpointVerificationError

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, after checking the header against the file size.

    Raises:
        CheckpointVerificationError: the file is truncated, has trailing bytes, or its header is not valid.
    """
    path = Path(path)

    def damaged(detail: str) -> CheckpointVerificationError:
        return CheckpointVerificationError(
            f"{path} is truncated or corrupted ({detail}). Download or save the checkpoint again."
        )

    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise damaged(f"{size} bytes, shorter than the 8-byte header length")
        header_length = int.from_bytes(prefix, "little")
        if header_length > min(size - 8, _MAX_HEADER_BYTES):
            raise damaged(f"header of {header_length} bytes announced, file has {size}")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as error:
            raise damaged(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
            expected_bytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise damaged(f"bad header entry for {name!r}") from None
        if stop - begin != expected_bytes or begin < 0:
            raise damaged(f"{name!r} spans {stop - begin} bytes, its shape {list(shape)} of {dtype} needs {expected_bytes}")
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    if 8 + header_length + end != size:
        raise damaged(f"the header describes {8 + header_length + end} bytes, the file has {size}")
    return tensors


def checkpoint_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded or not); every shard the index names must exist."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointVerificationError(
                f"{index} is not a valid shard index ({error}). Download or save the checkpoint again."
            ) from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise CheckpointVerificationError(
                f"{index} names shards that do not exist: {missing[:3]}. Download or save the checkpoint again."
            )
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise CheckpointVerificationError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json: no safetensors weights."
    )


def verify_saved_checkpoint(directory: str | Path, expected_parameters: int | None = None) -> int:
    """Check that a checkpoint folder reloads: config, every shard's header, names and shapes, parameter count.

    The architecture is built from ``config.json`` on the meta device (no memory, no weights read) and every tensor
    it declares must be stored with its shape (tied weights excepted), nothing else may be stored, and its parameter
    count must equal ``expected_parameters`` (the report's figure) when given.

    Returns:
        The parameter count.

    Raises:
        CheckpointVerificationError: naming what is wrong.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as error:  # transformers raises OSError, ValueError or KeyError for a bad config.json
        raise CheckpointVerificationError(
            f"The checkpoint in {directory} has no loadable config.json ({type(error).__name__}: {error})."
        ) from error
    stored: dict[str, tuple[int, ...]] = {}
    for path in checkpoint_weight_files(directory):
        stored.update({name: shape for name, (_, shape) in read_safetensors_header(path).items()})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # not done by from_config here; the count must hold tied weights once
    declared = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(name for name in declared if name not in stored and name not in tied)
    unexpected = sorted(name for name in stored if name not in declared)
    wrong = sorted(f"{name} {list(stored[name])} vs {list(declared[name])}"
                   for name in stored if name in declared and stored[name] != declared[name])
    if missing or unexpected or wrong:
        raise CheckpointVerificationError(
            f"The checkpoint in {directory} does not match its config.json: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shapes {wrong[:3]}. It was not written completely; write it again."
        )
    count = model.num_parameters()
    if expected_parameters is not None and count != expected_parameters:
        raise CheckpointVerificationError(
            f"The checkpoint in {directory} has {count:,} parameters but the pruning report promises "
            f"{expected_parameters:,}. This is a bug in optimum-olica; please report it."
        )
    return count


__all__ = ["checkpoint_weight_files", "read_safetensors_header", "verify_saved_checkpoint"]
