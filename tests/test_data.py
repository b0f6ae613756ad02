import json
import os

import datasets
import pytest
import torch

from optimum_olica import data
from optimum_olica.data import (
    SUPPORTED_EXTENSIONS,
    bundled_calibration_text,
    get_calibration_dataset,
    load_calibration_texts,
    tokenize_for_perplexity,
)

EVAL_TEXT_PATH = os.path.join(os.path.dirname(__file__), "data", "pride_and_prejudice_eval.txt")


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, from the cached conversion of the default model."""
    from transformers import AutoTokenizer

    from optimum_olica.default_model import default_model_path

    try:
        path = default_model_path()
    except ImportError as error:
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def bundled_token_ids(tokenizer):
    return tokenizer(bundled_calibration_text(), add_special_tokens=False, verbose=False)["input_ids"]


def _paragraphs(count: int) -> list[str]:
    # Distinct documents of about 60 tokens each.
    return [f"Document {index}. " + "The quick brown fox jumps over the lazy dog. " * 6 for index in range(count)]


def _is_window_of(window: torch.Tensor, token_ids: torch.Tensor) -> bool:
    length = window.numel()
    candidates = token_ids.unfold(0, length, 1)  # (n_tokens - length + 1, length)
    return bool((candidates == window).all(dim=1).any())


# --------------------------------------------------------------------------- bundled texts


def test_bundled_text_is_austen_without_pride_and_prejudice():
    text = bundled_calibration_text()
    assert 350_000 < len(text.encode("utf-8")) < 450_000
    assert text.startswith("CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich")
    for opening in ("About thirty years ago Miss Maria Ward", "No one who had ever seen Catherine Morland",
                    "Sir Walter Elliot, of Kellynch Hall", "The family of Dashwood had long been settled"):
        assert opening in text
    assert "universally acknowledged" not in text  # the evaluation novel stays out
    assert "Gutenberg" not in text and "\n\n\n" not in text


def test_eval_text_has_32k_tokens(tokenizer):
    with open(EVAL_TEXT_PATH, encoding="utf-8") as file:
        text = file.read()
    assert text.startswith("Chapter 1\n\nIt is a truth universally acknowledged")
    token_ids = tokenize_for_perplexity(tokenizer, text)
    assert token_ids.shape[0] == 1 and token_ids.shape[1] >= 32_768
    assert not set(bundled_calibration_text().split("\n\n")[5:50]) & set(text.split("\n\n"))


# --------------------------------------------------------------------------- windows


def test_default_shape_dtype_and_windows_come_from_the_text(tokenizer, bundled_token_ids):
    samples = get_calibration_dataset(tokenizer)
    assert samples.shape == (128, 128) and samples.dtype == torch.long
    token_ids = torch.tensor(bundled_token_ids)
    for row in samples[:8]:
        assert _is_window_of(row, token_ids)


def test_same_seed_same_tensor_other_seed_other_tensor(tokenizer):
    first = get_calibration_dataset(tokenizer, num_samples=16, sequence_length=32, seed=3)
    second = get_calibration_dataset(tokenizer, num_samples=16, sequence_length=32, seed=3)
    other = get_calibration_dataset(tokenizer, num_samples=16, sequence_length=32, seed=4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_offsets_follow_the_seeded_generator(tokenizer, bundled_token_ids):
    num_samples, sequence_length, seed = 5, 20, 11
    starts = torch.randint(
        0, len(bundled_token_ids) - sequence_length + 1, (num_samples,), generator=torch.Generator().manual_seed(seed)
    )
    expected = torch.stack([torch.tensor(bundled_token_ids[s : s + sequence_length]) for s in starts.tolist()])
    assert torch.equal(get_calibration_dataset(tokenizer, "austen", num_samples, sequence_length, seed), expected)


def test_no_special_tokens_added(tokenizer):
    samples = get_calibration_dataset(tokenizer, ["Hello there. " * 200], num_samples=4, sequence_length=16)
    assert tokenizer.bos_token_id not in samples.flatten().tolist()


# --------------------------------------------------------------------------- in-memory sources


def test_list_and_tuple_sources(tokenizer):
    documents = _paragraphs(20)
    from_list = get_calibration_dataset(tokenizer, documents, num_samples=8, sequence_length=32)
    from_tuple = get_calibration_dataset(tokenizer, tuple(documents), num_samples=8, sequence_length=32)
    assert torch.equal(from_list, from_tuple)
    joined = torch.tensor(tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"])
    assert all(_is_window_of(row, joined) for row in from_list)


def test_dataset_source_matches_list_source(tokenizer):
    documents = _paragraphs(20)
    dataset = datasets.Dataset.from_dict({"id": list(range(20)), "text": documents})
    expected = get_calibration_dataset(tokenizer, documents, num_samples=8, sequence_length=32)
    assert torch.equal(get_calibration_dataset(tokenizer, dataset, num_samples=8, sequence_length=32), expected)
    dataset_dict = datasets.DatasetDict({"validation": dataset})
    assert torch.equal(
        get_calibration_dataset(tokenizer, dataset_dict, num_samples=8, sequence_length=32, split="validation"),
        expected,
    )
    with pytest.raises(ValueError, match=r"no split 'train'.*validation"):
        load_calibration_texts(dataset_dict)


def test_text_column_resolution():
    documents = ["one", "two"]
    only_string = datasets.Dataset.from_dict({"id": [1, 2], "body": documents})
    assert load_calibration_texts(only_string) == documents
    two_strings = datasets.Dataset.from_dict({"title": ["a", "b"], "body": documents})
    with pytest.raises(ValueError, match=r"holds the text.*\['title', 'body'\].*text_column="):
        load_calibration_texts(two_strings)
    assert load_calibration_texts(two_strings, text_column="body") == documents
    with pytest.raises(ValueError, match=r"text_column='content'.*\['title', 'body'\]"):
        load_calibration_texts(two_strings, text_column="content")
    with_text = datasets.Dataset.from_dict({"title": ["a", "b"], "text": documents})
    assert load_calibration_texts(with_text) == documents


def test_a_text_column_error_can_name_the_command_line_flag():
    from optimum_olica.data import TextColumnError
    from optimum_olica.errors import CalibrationDataError

    two_strings = datasets.Dataset.from_dict({"title": ["a", "b"], "body": ["one", "two"]})
    with pytest.raises(TextColumnError) as error:
        load_calibration_texts(two_strings)
    assert isinstance(error.value, CalibrationDataError)
    assert "Pass text_column=NAME with one of ['title', 'body']." in str(error.value)
    assert "Pass --text-column NAME with one of ['title', 'body']." in error.value.message_for("--text-column ")


@pytest.mark.parametrize("content", ["", "\n  \n"])
@pytest.mark.parametrize("extension", [".jsonl", ".json", ".csv", ".parquet"])
def test_an_empty_file_is_called_empty(content, extension, tmp_path):
    from optimum_olica.errors import CalibrationDataError

    empty = tmp_path / f"empty{extension}"
    empty.write_text(content)
    message = rf"Calibration file '.*empty\{extension}' is empty.*'austen'"
    with pytest.raises(CalibrationDataError, match=message) as error:
        load_calibration_texts(empty)
    assert "StopIteration" not in str(error.value)


def test_empty_files_of_a_folder_are_skipped_and_a_folder_of_them_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.csv").write_text("")
    with pytest.raises(ValueError, match=r"holds only empty files \(2\)"):
        load_calibration_texts(tmp_path)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "some words"}) + "\n")
    assert load_calibration_texts(tmp_path) == ["some words"]


def test_blank_documents_dropped():
    assert load_calibration_texts(["a", "", "  \n", "b"]) == ["a", "b"]
    assert load_calibration_texts(datasets.Dataset.from_dict({"text": ["a", None, "b"]})) == ["a", "b"]


# --------------------------------------------------------------------------- local files


def test_local_files_of_every_format(tmp_path, tokenizer):
    documents = _paragraphs(12)
    (tmp_path / "corpus.txt").write_text("\n\n".join(documents), encoding="utf-8")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (tmp_path / "corpus.json").write_text(json.dumps([{"id": i, "text": d} for i, d in enumerate(documents)]))
    datasets.Dataset.from_dict({"text": documents}).to_csv(str(tmp_path / "corpus.csv"), index=False)
    datasets.Dataset.from_dict({"content": documents}).to_parquet(str(tmp_path / "corpus.parquet"))

    expected = get_calibration_dataset(tokenizer, documents, num_samples=4, sequence_length=32)
    for extension in SUPPORTED_EXTENSIONS:
        path = tmp_path / f"corpus{extension}"
        assert torch.equal(get_calibration_dataset(tokenizer, path, num_samples=4, sequence_length=32), expected), path
        assert torch.equal(get_calibration_dataset(tokenizer, str(path), num_samples=4, sequence_length=32), expected)


def test_local_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "from json"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_calibration_texts(tmp_path) == ["first file", "second file", "from json"]


def test_empty_folder_lists_supported_extensions(tmp_path):
    (tmp_path / "notes.md").write_text("ignored")
    with pytest.raises(ValueError, match=r"no readable files.*\.txt, \.json, \.jsonl, \.parquet, \.csv"):
        load_calibration_texts(tmp_path)


def test_unsupported_file_format(tmp_path):
    path = tmp_path / "book.pdf"
    path.write_text("not really a pdf")
    with pytest.raises(ValueError, match=r"unsupported extension '\.pdf'.*\.txt, \.json, \.jsonl, \.parquet, \.csv"):
        load_calibration_texts(path)


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="no_such_corpus.txt"):
        load_calibration_texts("no_such_corpus.txt")


# --------------------------------------------------------------------------- errors


def test_hub_failure_is_clear(monkeypatch):
    # No network here: force offline mode so the Hub lookup fails at once.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'made-up-org/no-such-corpus'.*Hub.*local file") as error:
        load_calibration_texts("made-up-org/no-such-corpus")
    assert ".jsonl" in str(error.value) and "'austen'" in str(error.value)


def test_hub_shortcut_split_check():
    with pytest.raises(ValueError, match=r"'c4' shortcut has splits \['train', 'validation'\], not 'test'"):
        load_calibration_texts("c4", split="test")


@pytest.mark.parametrize("source", [[], ["", "   "], datasets.Dataset.from_dict({"text": [""]})])
def test_empty_source(source):
    with pytest.raises(ValueError, match="no text"):
        load_calibration_texts(source)


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        load_calibration_texts(tmp_path / "empty.txt")


def test_unsupported_source_types():
    with pytest.raises(TypeError, match="int"):
        load_calibration_texts(42)
    with pytest.raises(TypeError, match="only strings"):
        load_calibration_texts(["fine", 3])


def test_fewer_tokens_than_one_window(tokenizer):
    with pytest.raises(ValueError, match=r"has \d+ tokens, need at least 64"):
        get_calibration_dataset(tokenizer, ["A short text."], num_samples=1, sequence_length=64)


def test_fewer_tokens_than_samples_times_length(tokenizer):
    documents = _paragraphs(3)  # about 180 tokens
    with pytest.raises(ValueError, match=r"num_samples x sequence_length = 16 x 32 = 512.*fewer samples"):
        get_calibration_dataset(tokenizer, documents, num_samples=16, sequence_length=32)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_samples": 0}, "num_samples"), ({"sequence_length": 0}, "sequence_length"), ({"seed": -1}, "seed"),
     ({"num_samples": 2.0}, "num_samples")],
)
def test_bad_arguments(tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        get_calibration_dataset(tokenizer, **kwargs)


# --------------------------------------------------------------------------- large sources


class _RecordingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, **kwargs)


def test_large_source_only_tokenizes_what_is_needed(tokenizer, monkeypatch):
    monkeypatch.setattr(data, "_MIN_CHARS", 0)
    documents = _paragraphs(200)  # about 56 KB
    recording = _RecordingTokenizer(tokenizer)
    first = get_calibration_dataset(recording, documents, num_samples=4, sequence_length=32, seed=1)
    # 4 x 32 tokens needed: only 32 characters per needed token are tokenized.
    (text,) = recording.texts
    assert len(text) == 4 * 32 * data._CHARS_PER_NEEDED_TOKEN
    # Whole documents, shuffled with the seed before the cut (only the last one is cut short).
    chunks = text.split("\n\n")
    assert all(chunk in documents for chunk in chunks[:-1])
    assert chunks[:-1] != documents[: len(chunks) - 1]
    assert torch.equal(first, get_calibration_dataset(recording, documents, num_samples=4, sequence_length=32, seed=1))
    assert recording.texts[1] == text
    get_calibration_dataset(recording, documents, num_samples=4, sequence_length=32, seed=2)
    assert recording.texts[2] != text


def test_small_source_is_used_whole_and_in_order(tokenizer):
    recording = _RecordingTokenizer(tokenizer)
    get_calibration_dataset(recording, num_samples=2, sequence_length=16)
    assert recording.texts == [bundled_calibration_text()]


# --------------------------------------------------------------------------- perplexity helper


def test_tokenize_for_perplexity(tokenizer):
    text = "It is a truth universally acknowledged. " * 20
    full = tokenize_for_perplexity(tokenizer, text)
    assert full.dtype == torch.long and full.shape[0] == 1
    assert full[0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = tokenize_for_perplexity(tokenizer, text, num_tokens=10)
    assert truncated.shape == (1, 10) and torch.equal(truncated, full[:, :10])
    with pytest.raises(ValueError, match=rf"has {full.shape[1]} tokens, fewer than num_tokens=100000"):
        tokenize_for_perplexity(tokenizer, text, num_tokens=100_000)
    with pytest.raises(ValueError, match="empty"):
        tokenize_for_perplexity(tokenizer, "")
