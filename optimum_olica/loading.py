"""Where a model and its tokenizer come from: local paths checked before the Hub is asked, tokenizers loaded first.

transformers treats any name that is not an existing folder as a Hub repo id, so a mistyped local path comes back as
"Repo id must be in the form 'repo_name' or 'namespace/repo_name'"; `check_model_location` says "no such folder"
instead. `load_tokenizer` runs before the model is loaded (which can take minutes) and fails with one line naming the
folder, where transformers would explain how it tried to convert a slow tokenizer. Callers add the fix in their own
terms (``tokenizer=`` in Python, ``--tokenizer`` on the command line).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from .errors import OlicaError

__all__ = [
    "TokenizerNotFoundError",
    "check_model_location",
    "load_config",
    "load_tokenizer",
    "location_kwargs",
    "looks_like_local_path",
]

# Files one of which a folder holding a tokenizer has (fast, sentencepiece, BPE and WordPiece tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")
# The from_pretrained arguments that say where a checkpoint's files are, so they also locate its config and tokenizer
# (the model's dtype or device map do not).
_LOCATION_KEYS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
# A Hub repo id: "name" or "namespace/name", letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class TokenizerNotFoundError(OlicaError):
    """No tokenizer could be loaded from the given folder or Hub id."""


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub repo id (``name`` or ``namespace/name``).

    It is when it cannot be a repo id (it starts with ``/``, ``.`` or ``~``, holds a backslash or two slashes), or when
    its parent folder exists here (``models/llama`` beside a ``models`` folder).
    """
    if name.startswith((".", "~")) or os.path.isabs(name) or "\\" in name or name.count("/") > 1:
        return True
    if not _HUB_ID.fullmatch(name):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def _where_to_look(path: Path, name: str) -> str:
    """What the folder around a missing path holds, to spot the typo (a sentence ending, with its punctuation)."""
    parent, spelled_parent = path.parent, os.path.dirname(name.rstrip("/\\")) or "."
    if not parent.is_dir():
        return f": its parent folder {spelled_parent!r} does not exist either."
    folders = [entry.name for entry in parent.iterdir() if entry.is_dir()]
    similar = difflib.get_close_matches(path.name, folders, n=3)
    hint = "."
    if similar:
        hint = f". Did you mean {' or '.join(repr(os.path.join(spelled_parent, folder)) for folder in similar)}?"
    if _HUB_ID.fullmatch(name):  # 'models/llama' beside a 'models' folder: it could also have meant the Hub
        hint += f" (To load the Hub model {name!r} instead, run from a folder without a {spelled_parent!r} folder.)"
    return hint


def check_model_location(name: str | os.PathLike) -> None:
    """Refuses a local path that does not exist before anything is asked of the Hub.

    Raises:
        FileNotFoundError: if ``name`` looks like a local path (see `looks_like_local_path`) and nothing is there.
    """
    name = os.fspath(name)
    path = Path(name).expanduser()
    if path.exists() or not looks_like_local_path(name):
        return
    raise FileNotFoundError(f"No such folder: {name!r}{_where_to_look(path, name)}")


def location_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's from_pretrained arguments that also locate its config and its tokenizer."""
    return {key: model_kwargs[key] for key in _LOCATION_KEYS if key in model_kwargs}


def load_config(name: str | os.PathLike, model_kwargs: dict[str, Any]):
    """The config of the checkpoint ``name`` alone (a small JSON file, no weights), read with the model's loading
    arguments that locate it."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, **location_kwargs(model_kwargs))


def load_tokenizer(name: str | os.PathLike, **loading_kwargs):
    """``AutoTokenizer.from_pretrained(name)``, with a one-line error that names the folder or Hub id.

    Args:
        name: a local folder or a Hub id.
        loading_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``trust_remote_code``,
            ``subfolder``.

    Raises:
        FileNotFoundError: ``name`` is a local path that does not exist (`check_model_location`).
        TokenizerNotFoundError: no tokenizer could be loaded from ``name``. The message states the problem only:
            callers add how to pass another tokenizer in their own terms.
    """
    from transformers import AutoTokenizer

    name = os.fspath(name)
    check_model_location(name)
    folder = Path(name).expanduser() / loading_kwargs.get("subfolder", "")
    if folder.is_dir() and not any((folder / file).exists() for file in TOKENIZER_FILES):
        # Checked before transformers is asked: some releases (5.4 among them) do not fail on such a folder but build
        # a tokenizer of the model's family from config.json alone, with special tokens and no vocabulary.
        raise TokenizerNotFoundError(f"{name!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(name, **location_kwargs(loading_kwargs))
    except (OSError, ValueError) as error:
        raise TokenizerNotFoundError(
            f"No tokenizer could be loaded from {name!r} ({' '.join(str(error).split())})"
        ) from error
