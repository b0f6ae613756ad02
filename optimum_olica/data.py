"""Calibration data: text sources -> random token windows.

`get_calibration_dataset` turns a text source into a `(num_samples,
sequence_length)` tensor of token ids the way GPTQ, SparseGPT and the Olica
reference do it: join the documents with blank lines, tokenize once without
special tokens, and cut `num_samples` windows at uniformly random offsets
drawn from a seeded generator.

Sources: the bundled text (``"austen"``), a list of strings, a
`datasets.Dataset`, a local file or folder (.txt, .json, .jsonl, .parquet,
.csv), or a Hub dataset name (``"wikitext2"`` and ``"c4"`` are shortcuts for
the usual calibration subsets).

The bundled text, ``resources/calibration_austen.txt`` (about 400 KB), is
public-domain Jane Austen from Project Gutenberg: about 80 KB of contiguous
text from the start of chapter 1 of each of Emma, Mansfield Park, Northanger
Abbey, Persuasion and Sense and Sensibility (cut at a paragraph end, runs of
blank lines collapsed to one, novels separated by a blank line). Pride and
Prejudice is left out on purpose: the tests and examples measure perplexity on
its beginning (``tests/data/pride_and_prejudice_eval.txt``, built the same
way, about 35,000 SmolLM2 tokens), so calibration and evaluation text never
overlap.

Importing this module is cheap: `datasets` is imported only when a file or
Hub source needs it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .configuration import BUNDLED_SOURCE
from .errors import CalibrationDataError

__all__ = [
    "BUNDLED_SOURCE",
    "HUB_SHORTCUTS",
    "SUPPORTED_EXTENSIONS",
    "TextColumnError",
    "bundled_calibration_text",
    "get_calibration_dataset",
    "load_calibration_texts",
    "tokenize_for_perplexity",
]

_BUNDLED_RESOURCE = ("resources", "calibration_austen.txt")

# Extension -> `datasets` builder (None: read as plain text, one document per file).
_BUILDERS = {".txt": None, ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SUPPORTED_EXTENSIONS = tuple(_BUILDERS)

# Hub shortcuts used by GPTQ/SparseGPT/Olica: name -> (dataset path, config name, data files per split).
HUB_SHORTCUTS: dict[str, tuple[str, str | None, dict[str, str] | None]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", None),
    "c4": (
        "allenai/c4",
        None,
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}

_DOCUMENT_SEPARATOR = "\n\n"
# Only the first part of a large source is tokenized: at most this many characters
# per needed token (English BPE averages 4-5 characters per token, so this leaves
# several times more tokens than the windows need), and never less than
# _MIN_CHARS so that small requests still draw from a varied text (the whole
# bundled text is always used).
_CHARS_PER_NEEDED_TOKEN = 32
_MIN_CHARS = 1_000_000


def bundled_calibration_text() -> str:
    """Returns the bundled calibration text (public-domain Jane Austen, about 400 KB)."""
    resource = importlib.resources.files("optimum_olica").joinpath(*_BUNDLED_RESOURCE)
    return resource.read_text(encoding="utf-8")


def _is_dataset(source: Any) -> bool:
    # A Dataset object means `datasets` is already imported: no import needed to check.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(source, (datasets.Dataset, datasets.DatasetDict))


class TextColumnError(CalibrationDataError):
    """Which column of a tabular calibration source holds the text is unclear, or the one named does not exist.

    The message names the Python argument (``text_column=``); `message_for` phrases it for another interface, as the
    command line does with ``--text-column``.
    """

    def __init__(self, source_name: str, columns: list[str], string_columns: list[str], given: str | None = None):
        self.source_name, self.columns, self.string_columns, self.given = source_name, columns, string_columns, given
        super().__init__(self.message_for("text_column="))

    def message_for(self, argument: str) -> str:
        """The message, with ``argument`` (``"text_column="``, ``"--text-column "``) as the way to name a column."""
        if self.given is not None:
            return (
                f"{argument}{self.given!r} is not a column of {self.source_name}; its columns are {self.columns}. "
                f"Pass {argument}NAME with one of them."
            )
        return (
            f"Cannot tell which column of {self.source_name} holds the text: no 'text' column and "
            f"{len(self.string_columns)} string columns among {self.columns}. Pass {argument}NAME with one of "
            f"{self.string_columns or self.columns}."
        )


def _text_column(dataset: Any, text_column: str | None, source_name: str) -> str:
    columns = list(dataset.column_names)
    string_columns = [
        name
        for name, feature in dataset.features.items()
        if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    if text_column is not None:
        if text_column not in columns:
            raise TextColumnError(source_name, columns, string_columns, given=text_column)
        return text_column
    if "text" in columns:
        return "text"
    if len(string_columns) == 1:
        return string_columns[0]
    raise TextColumnError(source_name, columns, string_columns)


def _dataset_texts(dataset: Any, text_column: str | None, split: str, source_name: str) -> list[str]:
    datasets = sys.modules["datasets"]
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source_name} has no split {split!r}; its splits are {list(dataset)}. Pass split=...")
        dataset = dataset[split]
    column = _text_column(dataset, text_column, source_name)
    return list(dataset[column])


def _is_blank(file: str) -> bool:
    """Whether a file holds nothing but whitespace (`datasets` fails on such a file with a bare StopIteration)."""
    size = os.path.getsize(file)
    if size == 0:
        return True
    if size > 4096:  # whitespace-only files of this size are not worth reading to find out
        return False
    with open(file, "rb") as handle:
        return not handle.read().strip()


def _without_blank_files(path: str, files: list[str]) -> list[str]:
    """Drops empty files (they hold no documents); refuses a source that is nothing but empty files."""
    kept = [file for file in files if not _is_blank(file)]
    if kept:
        return kept
    what = f"Calibration file {path!r} is empty" if files == [path] else (
        f"Calibration folder {path!r} holds only empty files ({len(files)})"
    )
    raise CalibrationDataError(
        f"{what}: there is no text to calibrate on. Use a file with text (for .jsonl, one JSON object per line "
        f"with a 'text' field), or {BUNDLED_SOURCE!r} (the bundled text, the default)."
    )


@contextlib.contextmanager
def _without_progress_bars(datasets: Any):
    """No "Generating train split" bar for local files: they are read in moments, and on the command line the bar
    would come before a one-line error about the data."""
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def _load_local(path: str, text_column: str | None, split: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if os.path.splitext(name)[1].lower() in _BUILDERS
        )
        if not files:
            raise ValueError(
                f"Calibration folder {path!r} holds no readable files; supported extensions: "
                f"{', '.join(SUPPORTED_EXTENSIONS)}."
            )
    else:
        extension = os.path.splitext(path)[1].lower()
        if extension not in _BUILDERS:
            raise ValueError(
                f"Cannot read calibration file {path!r}: unsupported extension {extension or '(none)'!r}; "
                f"supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}."
            )
        files = [path]
    files = _without_blank_files(path, files)

    texts: list[str] = []
    # Plain text first, then each `datasets` builder once over all its files (sorted within each group).
    for file in files:
        if _BUILDERS[os.path.splitext(file)[1].lower()] is None:
            with open(file, encoding="utf-8") as handle:
                texts.append(handle.read())
    for builder in sorted({b for b in _BUILDERS.values() if b is not None}):
        builder_files = [f for f in files if _BUILDERS[os.path.splitext(f)[1].lower()] == builder]
        if not builder_files:
            continue
        import datasets  # only now: it is slow to import

        try:
            with _without_progress_bars(datasets):
                dataset = datasets.load_dataset(builder, data_files=builder_files, split="train")
        except Exception as error:  # the builders raise many types; name the files either way
            detail = " ".join(str(error).split()) or "no detail"  # one line on the command line
            raise ValueError(
                f"Could not read {builder_files} as {builder}: {type(error).__name__}: {detail}"
            ) from error
        texts.extend(_dataset_texts(dataset, text_column, split, f"{builder_files}"))
    return texts


def _load_hub(name: str, text_column: str | None, split: str) -> list[str]:
    import datasets

    path, config_name, data_files = HUB_SHORTCUTS.get(name, (name, None, None))
    if data_files is not None:
        if split not in data_files:
            raise ValueError(f"The {name!r} shortcut has splits {list(data_files)}, not {split!r}.")
        data_files = {split: data_files[split]}
    try:
        dataset = datasets.load_dataset(path, config_name, data_files=data_files, split=split)
    except Exception as error:  # offline, unknown name, missing split, auth...: all end the same way
        raise ValueError(
            f"Could not load calibration source {name!r} as a Hugging Face Hub dataset "
            f"({type(error).__name__}: {error}). It is not the bundled {BUNDLED_SOURCE!r} text, nor an "
            "existing local path. Check the name and your network, or use a local file or folder "
            f"({', '.join(SUPPORTED_EXTENSIONS)}), a list of strings, or {BUNDLED_SOURCE!r}."
        ) from error
    return _dataset_texts(dataset, text_column, split, f"Hub dataset {name!r}")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", ".\\")) or os.path.splitext(source)[1].lower() in _BUILDERS


def load_calibration_texts(
    source: Any = BUNDLED_SOURCE, *, text_column: str | None = None, split: str = "train"
) -> list[str]:
    """Reads a calibration source into a list of documents (strings), in source order.

    Args:
        source: ``"austen"`` (the bundled text), a list or tuple of strings, a
            `datasets.Dataset` or `DatasetDict`, a local file or folder
            (.txt read as plain text, one document per file; .json, .jsonl,
            .parquet, .csv read with `datasets`), or a Hub dataset name
            (``"wikitext2"`` and ``"c4"`` are shortcuts).
        text_column: Column holding the text, for tabular sources. Defaults to
            ``"text"`` if present, else the only string column.
        split: Split to read from Hub datasets and `DatasetDict` sources.

    Returns:
        The documents; None and blank documents are dropped.

    Raises:
        ValueError: if the source cannot be read or holds no text.
        FileNotFoundError: if `source` looks like a path but does not exist.
        TypeError: if `source` is of an unsupported type.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source == BUNDLED_SOURCE:
            texts = [bundled_calibration_text()]
        elif os.path.exists(os.path.expanduser(source)):
            texts = _load_local(os.path.expanduser(source), text_column, split)
        elif _looks_like_path(source):
            raise FileNotFoundError(f"Calibration file or folder {source!r} does not exist.")
        else:
            texts = _load_hub(source, text_column, split)
        name = repr(source)
    elif isinstance(source, (list, tuple)):
        bad = [index for index, text in enumerate(source) if not isinstance(text, str)]
        if bad:
            raise TypeError(
                f"A list calibration source must hold only strings; items {bad[:5]} are "
                f"{type(source[bad[0]]).__name__}."
            )
        texts, name = list(source), "the list source"
    elif _is_dataset(source):
        texts, name = _dataset_texts(source, text_column, split, "the Dataset source"), "the Dataset source"
    else:
        raise TypeError(
            f"Unsupported calibration source type {type(source).__name__}: use 'austen', a path, a Hub "
            "dataset name, a list of strings or a datasets.Dataset."
        )
    texts = [text for text in texts if text is not None and text.strip()]
    if not texts:
        raise ValueError(f"Calibration source {name} holds no text. Use a source with text, or {BUNDLED_SOURCE!r}.")
    return texts


def _join_documents(texts: Sequence[str], max_chars: int, seed: int) -> str:
    """Joins documents with blank lines, keeping at most about `max_chars` characters.

    A source that fits is used whole and in order. A larger one is cut: if it
    has several documents they are first shuffled with `seed` (so the cut does
    not always keep the same leading documents), then taken until `max_chars`.
    """
    total = sum(len(text) for text in texts) + len(_DOCUMENT_SEPARATOR) * (len(texts) - 1)
    if total <= max_chars:
        return _DOCUMENT_SEPARATOR.join(texts)
    if len(texts) > 1:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        texts = [texts[index] for index in order]
    kept, length = [], 0
    for text in texts:
        kept.append(text)
        length += len(text) + len(_DOCUMENT_SEPARATOR)
        if length >= max_chars:
            break
    return _DOCUMENT_SEPARATOR.join(kept)[:max_chars]


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: the whole text is far longer than model_max_length, on purpose.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def get_calibration_dataset(
    tokenizer: Any,
    source: Any = BUNDLED_SOURCE,
    num_samples: int = 128,
    sequence_length: int = 128,
    seed: int = 0,
    *,
    text_column: str | None = None,
    split: str = "train",
) -> torch.LongTensor:
    """Draws `num_samples` random windows of `sequence_length` tokens from a text source.

    The documents are joined with blank lines and tokenized once, without
    special tokens; window starts are uniform in ``[0, n_tokens -
    sequence_length]``, drawn with ``torch.Generator().manual_seed(seed)``,
    so the same arguments always give the same tensor. Windows may overlap;
    the source must hold at least ``num_samples * sequence_length`` tokens so
    that they do not overlap too much. For large sources only the first part
    (at least 1M characters, and 32 characters per needed token) is
    tokenized; several documents are shuffled with `seed` before that cut.

    Args:
        tokenizer: A Hugging Face tokenizer (called with ``add_special_tokens=False``).
        source: See `load_calibration_texts`; defaults to the bundled Austen text.
        num_samples: Number of windows, >= 1.
        sequence_length: Tokens per window, >= 1.
        seed: Seed for the window offsets (and the document shuffle of large sources).
        text_column: Text column of tabular sources (default: ``"text"``, else the only string column).
        split: Split of Hub datasets and `DatasetDict` sources.

    Returns:
        A `torch.long` tensor of shape `(num_samples, sequence_length)`.

    Raises:
        ValueError: if the arguments are out of range, the source cannot be
            read or has too few tokens.
    """
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("sequence_length", sequence_length)
    _check_positive_int("seed", seed, minimum=0)

    texts = load_calibration_texts(source, text_column=text_column, split=split)
    needed_tokens = num_samples * sequence_length
    text = _join_documents(texts, max(_MIN_CHARS, _CHARS_PER_NEEDED_TOKEN * needed_tokens), seed)
    token_ids = torch.tensor(_token_ids(tokenizer, text), dtype=torch.long)  # (n_tokens,)
    n_tokens = token_ids.numel()
    source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if n_tokens < sequence_length:
        raise ValueError(
            f"Calibration source {source_name!r} has {n_tokens} tokens, need at least {sequence_length} "
            f"(sequence_length). Use a larger source or a shorter sequence_length."
        )
    if n_tokens < needed_tokens:
        raise ValueError(
            f"Calibration source {source_name!r} has {n_tokens} tokens, fewer than num_samples x "
            f"sequence_length = {num_samples} x {sequence_length} = {needed_tokens}: the windows would "
            "mostly repeat the same text. Use fewer samples, shorter sequences or a larger source."
        )

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - sequence_length + 1, (num_samples,), generator=generator)
    # (num_samples, 1) + (1, sequence_length) -> (num_samples, sequence_length) token positions
    positions = starts[:, None] + torch.arange(sequence_length)[None, :]
    return token_ids[positions]


def tokenize_for_perplexity(tokenizer: Any, text: str, num_tokens: int | None = None) -> torch.LongTensor:
    """Tokenizes a whole evaluation text, without special tokens, for perplexity.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The evaluation text.
        num_tokens: Keep only the first `num_tokens` tokens; None keeps all.

    Returns:
        A `torch.long` tensor of shape `(1, n_tokens)`.

    Raises:
        ValueError: if the text is empty or shorter than `num_tokens` tokens.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    if num_tokens is not None:
        _check_positive_int("num_tokens", num_tokens)
    token_ids = _token_ids(tokenizer, text)
    if not token_ids:
        raise ValueError("The evaluation text is empty: it has 0 tokens.")
    if num_tokens is not None:
        if len(token_ids) < num_tokens:
            raise ValueError(
                f"The evaluation text has {len(token_ids)} tokens, fewer than num_tokens={num_tokens}. "
                "Use a longer text or a smaller num_tokens."
            )
        token_ids = token_ids[:num_tokens]
    return torch.tensor(token_ids, dtype=torch.long)[None, :]  # (1, n_tokens)
