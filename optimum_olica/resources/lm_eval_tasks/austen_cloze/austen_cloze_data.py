"""Loads the austen_cloze JSONL for lm-eval, resolving relative data files against this folder.

lm-eval hands ``dataset_kwargs`` to `datasets.load_dataset`, which resolves relative paths against the working
directory; a task shipped inside a package must not depend on where the user runs from. The task YAML names this
function as its ``custom_dataset``; lm-eval calls it with the task's ``dataset_kwargs`` and ``metadata``.
"""

from __future__ import annotations

from pathlib import Path

TASK_FOLDER = Path(__file__).resolve().parent


def load_local_json(data_files: dict[str, str], **unused_task_metadata):
    """Returns a `datasets.DatasetDict` with one split per entry of ``data_files`` (paths relative to this folder)."""
    import datasets

    resolved = {split: str(TASK_FOLDER / path) for split, path in data_files.items()}
    return datasets.load_dataset("json", data_files=resolved)
