"""Where the model and tokenizer come from (`optimum_olica.loading`, `OlicaPruner.from_pretrained`): a mistyped local
path is "no such folder", not a bad Hub repo id; the tokenizer is looked for before the weights are loaded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from optimum_olica.pruner import OlicaPruner

from tiny_checkpoint import save_tiny_dense_checkpoint


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return save_tiny_dense_checkpoint(tmp_path_factory.mktemp("dense") / "tiny-llama")


@pytest.fixture(scope="module")
def weights_only_dir(dense_dir, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("weights") / "weights-only"
    return Path(shutil.copytree(dense_dir, target, ignore=shutil.ignore_patterns("tokenizer*")))


@pytest.mark.parametrize(
    "name, is_path",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("gpt2", False),
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        ("/models/model", True),
        ("a/b/c", True),  # a Hub id has at most one slash
        ("my model", True),  # nor spaces
        ("models\\model", True),
    ],
)
def test_what_looks_like_a_local_path(name, is_path):
    from optimum_olica.loading import looks_like_local_path

    assert looks_like_local_path(name) is is_path


def test_a_hub_id_beside_a_folder_of_its_namespace_is_a_path(tmp_path, monkeypatch):
    from optimum_olica.loading import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("models/llama")
    (tmp_path / "models").mkdir()
    assert looks_like_local_path("models/llama")


@pytest.mark.parametrize("streaming", [False, True])
def test_from_pretrained_says_no_such_folder_for_a_mistyped_path(dense_dir, streaming):
    typo = f"{dense_dir.parent}/tiny-lama"
    with pytest.raises(FileNotFoundError, match=r"No such folder: '.*tiny-lama'\. Did you mean '.*tiny-llama'\?"):
        OlicaPruner.from_pretrained(typo, streaming=streaming)


def test_missing_tokenizer_is_one_warning_given_before_the_model_loads(weights_only_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    warned_before_loading = []

    def load_after_checking(*args, **kwargs):
        warned_before_loading.append(any(record.levelno == logging.WARNING for record in caplog.records))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_after_checking)
    with caplog.at_level(logging.WARNING, logger="optimum_olica"):
        pruner = OlicaPruner.from_pretrained(weights_only_dir)
    assert pruner.tokenizer is None
    assert warned_before_loading == [True]
    (warning,) = [record.getMessage() for record in caplog.records if record.name.startswith("optimum_olica")]
    assert f"{str(weights_only_dir)!r} holds no tokenizer" in warning and "Pass tokenizer=" in warning
    assert "\n" not in warning and "sentencepiece" not in warning


def test_tokenizer_given_as_a_folder_is_loaded_from_it(weights_only_dir, dense_dir):
    pruner = OlicaPruner.from_pretrained(weights_only_dir, tokenizer=str(dense_dir))
    assert pruner.tokenizer is not None and len(pruner.tokenizer) == pruner.model.config.vocab_size


def test_tokenizer_given_as_a_folder_without_one_is_an_error(weights_only_dir):
    from optimum_olica.loading import TokenizerNotFoundError

    with pytest.raises(TokenizerNotFoundError, match="holds no tokenizer"):
        OlicaPruner.from_pretrained(weights_only_dir, tokenizer=weights_only_dir)
