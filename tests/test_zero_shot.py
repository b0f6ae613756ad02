"""Zero-shot evaluation through lm-evaluation-harness, offline, on the bundled `austen_cloze` task.

The task data is checked against the script that builds it; lm-eval then really runs on a pruned tiny model loaded
with the plugin and, in a fresh process where optimum_olica cannot be imported, with ``trust_remote_code=True``: the
two loads must score the same. On the real SmolLM2 the dense model must be far above chance, which shows the task
measures something. Tiny models read text through the small BPE tokenizer of `tiny_checkpoint`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_olica  # noqa: F401  (registers the pruned architectures)
from optimum_olica.zero_shot import (
    BUNDLED_TASKS,
    LmEvalNotInstalledError,
    bundled_tasks_dir,
    evaluate_zero_shot,
    parse_task_names,
)

from tiny_checkpoint import save_tiny_pruned_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="the eval extra (lm-eval) is not installed"
)

TESTS_DIR = Path(__file__).resolve().parent
TASK = "austen_cloze"
TASK_DIR = bundled_tasks_dir() / TASK
LIMIT = 24  # documents per tiny-model run: 96 loglikelihood requests, a few seconds
NUM_CHOICES = 4


def load_cloze_script():
    spec = importlib.util.spec_from_file_location("make_austen_cloze", TESTS_DIR / "data" / "make_austen_cloze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_items() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_pruned_checkpoint(tmp_path_factory.mktemp("zero_shot") / "pruned")


@pytest.fixture(scope="module")
def plugin_results(pruned_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(pruned_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(pruned_checkpoint)
    assert type(model).__module__.startswith("optimum_olica."), type(model).__module__
    return evaluate_zero_shot(model, tokenizer, TASK, limit=LIMIT)


# ---- the task data ---------------------------------------------------------------------------------------------------


def test_task_data_is_what_its_script_writes(tmp_path):
    script = load_cloze_script()
    output = tmp_path / "items.jsonl"
    script.main(["--output", str(output)])
    assert output.read_bytes() == (TASK_DIR / f"{TASK}.jsonl").read_bytes()


def test_task_items_are_sentences_of_the_source_with_same_length_distractors():
    script = load_cloze_script()
    source = " ".join(script.SOURCE.read_text(encoding="utf-8").split())
    items = committed_items()
    assert len(items) == script.NUM_ITEMS == 100
    assert [item["id"] for item in items] == list(range(len(items)))
    for item in items:
        endings, label = item["endings"], item["label"]
        assert len(endings) == len(set(endings)) == NUM_CHOICES
        assert 0 <= label < NUM_CHOICES
        assert f"{item['context']} {endings[label]}" in source, item["id"]
        assert len({len(ending.split()) for ending in endings}) == 1, item["id"]  # length gives nothing away
    # The answer's position is shuffled: every position is used, none dominates.
    positions = Counter(item["label"] for item in items)
    assert set(positions) == set(range(NUM_CHOICES)) and max(positions.values()) <= 40, positions


# ---- evaluate_zero_shot ----------------------------------------------------------------------------------------------


def test_task_names_parse_from_a_string_or_a_list():
    assert parse_task_names(" austen_cloze, piqa ,") == ["austen_cloze", "piqa"]
    assert parse_task_names(["arc_easy"]) == ["arc_easy"]
    with pytest.raises(ValueError, match="No task names"):
        parse_task_names(" , ")


def test_bundled_task_is_the_default():
    assert BUNDLED_TASKS == (TASK,)
    assert (TASK_DIR / f"{TASK}.yaml").is_file()


def test_without_lm_eval_the_error_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(LmEvalNotInstalledError, match=r"pip install 'optimum-olica\[eval\]'") as caught:
        evaluate_zero_shot(None, None, TASK)
    assert isinstance(caught.value, ImportError)


@needs_lm_eval
def test_plugin_loaded_pruned_model_is_evaluated(plugin_results):
    assert set(plugin_results) == {TASK}
    metrics = plugin_results[TASK]
    assert metrics["num_samples"] == LIMIT
    for name in ("acc", "acc_norm"):
        assert 0.0 <= metrics[name] <= 1.0, metrics
        assert metrics[name] * LIMIT == pytest.approx(round(metrics[name] * LIMIT)), metrics  # a count of documents
        assert metrics[f"{name}_stderr"] > 0.0, metrics


@needs_lm_eval
def test_trust_remote_code_load_without_the_plugin_scores_the_same(pruned_checkpoint, plugin_results, tmp_path):
    output = tmp_path / "result.json"
    command = [
        sys.executable, str(TESTS_DIR / "lm_eval_probe.py"),
        str(pruned_checkpoint), str(bundled_tasks_dir()), TASK, str(LIMIT), str(output),
    ]
    # Another working directory: the task's relative data path must resolve beside its YAML, not in the cwd.
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    assert not result["optimum_olica_imported"]
    assert result["model_module"].startswith("transformers_modules."), result["model_module"]
    assert result["num_samples"] == LIMIT
    # The same weights and the same modeling code: the same choices on every document.
    assert result["results"]["acc,none"] == plugin_results[TASK]["acc"]
    assert result["results"]["acc_norm,none"] == plugin_results[TASK]["acc_norm"]


@needs_lm_eval
def test_include_path_adds_a_task_folder(pruned_checkpoint, tmp_path):
    # A copy of the bundled task under another name, with 10 items, in a folder of its own.
    folder = tmp_path / "my_tasks" / "austen_short"
    folder.mkdir(parents=True)
    shutil.copy(TASK_DIR / "austen_cloze_data.py", folder)
    lines = (TASK_DIR / f"{TASK}.jsonl").read_text(encoding="utf-8").splitlines()[:10]
    (folder / "short.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = (TASK_DIR / f"{TASK}.yaml").read_text(encoding="utf-8")
    config = config.replace(f"task: {TASK}", "task: austen_short").replace(f"test: {TASK}.jsonl", "test: short.jsonl")
    (folder / "austen_short.yaml").write_text(config, encoding="utf-8")

    model = AutoModelForCausalLM.from_pretrained(pruned_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(pruned_checkpoint)
    results = evaluate_zero_shot(model, tokenizer, "austen_short", include_path=tmp_path / "my_tasks")
    assert results["austen_short"]["num_samples"] == 10
    assert 0.0 <= results["austen_short"]["acc"] <= 1.0


@needs_lm_eval
def test_unknown_task_is_refused_with_the_name(pruned_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(pruned_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(pruned_checkpoint)
    with pytest.raises(ValueError, match="Unknown lm-eval task.*no_such_task_xyz"):
        evaluate_zero_shot(model, tokenizer, "no_such_task_xyz")


# ---- the real model --------------------------------------------------------------------------------------------------


@needs_lm_eval
@pytest.mark.real_model
def test_dense_smollm2_is_far_above_chance_on_the_bundled_task():
    from optimum_olica.default_model import default_model_path

    try:
        path = default_model_path()
    except ImportError as error:
        pytest.skip(str(error))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = 40
    metrics = evaluate_zero_shot(model, tokenizer, TASK, limit=limit, batch_size=16)[TASK]
    assert metrics["num_samples"] == limit
    # Chance is 0.25; with 40 documents a model guessing at random scores above 0.5 with probability below 1e-3.
    assert metrics["acc"] > 0.5 and metrics["acc_norm"] > 0.5, metrics
