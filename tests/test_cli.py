"""``optimum-cli olica``: end to end on a tiny model (prune, inspect, eval, reload), flags, errors and exit codes.

Most runs are in-process through `optimum_olica.commands.main` (the same parser optimum-cli builds, without a new
Python start); a few go through the real ``optimum-cli`` executable in a subprocess to check the registration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, without_upstream_noise
from tiny_checkpoint import make_tiny_tokenizer

from optimum_olica import OlicaConfig
from optimum_olica.commands import main
from optimum_olica.commands.prune import OlicaPruneCommand, config_flag_name, recipe_from_args

OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")
# A fixed refit damping: 'auto' cross-validates it, which costs seconds per layer even on a tiny model.
# --self-calibration 0: the runs these tests compare (streaming against in memory) calibrate on the same data
# (a streaming pruner holds no weights to generate with); the default's mix is tested on its own below.
FAST_RECIPE = ["--num-samples", "8", "--sequence-length", "32", "--num-calibrated-layers", "1", "--refit-damping",
               "0.1", "--self-calibration", "0", "--device", "cpu"]


def run_cli(*argv: str) -> int:
    """Runs ``optimum-cli olica <argv>`` in-process; returns the exit code."""
    try:
        main([str(arg) for arg in argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (GQA) with a real BPE tokenizer, saved like a Hub checkpoint."""
    directory = tmp_path_factory.mktemp("base")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model("llama_gqa", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pruned_dir(base_model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pruned") / "tiny-olica"
    code = run_cli("prune", base_model_dir, output, "--ratio", "0.2", "--skip-layers", "2", *FAST_RECIPE)
    assert code == 0
    return output


def test_prune_writes_a_checkpoint_with_the_recipe_the_flags_describe(pruned_dir):
    recipe = json.loads((pruned_dir / "olica_config.json").read_text())
    assert recipe == OlicaConfig(
        ratio=0.2, skip_layers=[2], num_samples=8, sequence_length=32, num_calibrated_layers=1, refit_damping=0.1,
        self_calibration=0.0,
    ).to_dict()
    report = json.loads((pruned_dir / "olica_report.json").read_text())
    assert report["device"] == "cpu" and report["streaming"] is False  # --device is the run's, not the recipe's
    # Whether the activations waited off the compute device: on a CPU run there is nowhere to offload them to.
    assert report["offload_activations"] is False
    assert report["calibration_data"]["source"] == "austen"
    assert report["calibration_data"]["num_tokens"] == 8 * 32
    assert abs(report["achieved_ratio"] - 0.2) < 0.05
    assert report["layers"][2]["intermediate_size"] == 96  # the skipped layer stays dense


def test_prune_by_default_mixes_the_models_own_text_into_the_bundled_text(base_model_dir, tmp_path):
    output = tmp_path / "default-calibration"
    assert run_cli("prune", base_model_dir, output, "--num-samples", "4", "--sequence-length", "16",
                   "--device", "cpu") == 0
    assert json.loads((output / "olica_config.json").read_text())["self_calibration"] == 0.5
    calibration = json.loads((output / "olica_report.json").read_text())["calibration_data"]
    assert (calibration["source"], calibration["self_generated_samples"]) == ("austen", 2)


def test_pruned_output_reloads_with_auto_model(pruned_dir):
    from transformers import AutoModelForCausalLM

    report = json.loads((pruned_dir / "olica_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert model.num_parameters() == report["parameters_after"]
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 42, 8]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_streaming_flag_prunes_from_the_files(base_model_dir, pruned_dir, tmp_path):
    """--streaming is from_pretrained(streaming=True), not a recipe field: the same result as in memory."""
    from safetensors.torch import load_file

    output = tmp_path / "streamed"
    assert run_cli("prune", base_model_dir, output, "--ratio", "0.2", "--skip-layers", "2", "--streaming",
                   *FAST_RECIPE) == 0
    report = json.loads((output / "olica_report.json").read_text())
    assert report["streaming"] is True
    assert json.loads((output / "olica_config.json").read_text()) == json.loads(
        (pruned_dir / "olica_config.json").read_text()
    )
    assert run_cli("inspect", output) == 0
    assert report["parameters_after"] == json.loads((pruned_dir / "olica_report.json").read_text())["parameters_after"]
    streamed = {}
    for shard in output.glob("*.safetensors"):
        streamed.update(load_file(shard))
    in_memory = load_file(pruned_dir / "model.safetensors")
    assert set(streamed) == set(in_memory)
    for name, tensor in in_memory.items():
        torch.testing.assert_close(streamed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_inspect_shows_layers_parameters_recipe_and_calibration(pruned_dir, capsys):
    assert run_cli("inspect", pruned_dir) == 0
    out = capsys.readouterr().out
    report = json.loads((pruned_dir / "olica_report.json").read_text())
    assert f"{report['parameters_before']:,} -> {report['parameters_after']:,}" in out
    assert "layer  q rank  k rank  v dim" in out  # format_summary's per-layer table
    for record in report["layers"]:
        assert f"{record['parameters']:,}" in out
    assert "austen: 8 x 32 tokens" in out
    assert re.search(r"^  refit_damping +0\.1$", out, re.MULTILINE)
    assert "OlicaLlamaForCausalLM" in out


def test_eval_perplexity_matches_the_python_api_and_is_recorded(pruned_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_olica.evaluation import evaluation_token_ids, perplexity

    results = tmp_path / "eval.json"
    code = run_cli("eval", pruned_dir, "--dataset", "pride-and-prejudice", "--max-tokens", "1024", "--sequence-length",
                   "64", "--output-json", results, "--record")
    assert code == 0
    (entry,) = json.loads(results.read_text())["evaluations"]
    assert entry["kind"] == "perplexity" and entry["dataset"] == "pride-and-prejudice"
    assert entry["num_tokens"] == 1024

    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    tokens = evaluation_token_ids(AutoTokenizer.from_pretrained(pruned_dir), num_tokens=1024)
    assert entry["value"] == pytest.approx(perplexity(model, tokens, sequence_length=64), rel=1e-6)

    recorded = json.loads((pruned_dir / "olica_report.json").read_text())["evaluations"]
    assert recorded == [entry]
    capsys.readouterr()
    assert run_cli("inspect", pruned_dir) == 0
    assert f"perplexity {entry['value']:.3f} on pride-and-prejudice" in capsys.readouterr().out


def _brute_force_perplexity(model, token_ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows, one window and one position at a time: a reference that shares
    nothing with `optimum_olica.evaluation.perplexity` but the definition."""
    import math

    total, count = 0.0, 0
    for start in range(0, len(token_ids) - window + 1, window):
        ids = torch.tensor([token_ids[start : start + window]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for position in range(window - 1):
            total -= float(log_probs[position, ids[0, position + 1]])
            count += 1
    return math.exp(total / count)


def test_eval_scores_every_bundled_text_and_its_ratio_to_dense(base_model_dir, pruned_dir, tmp_path, capsys):
    """By default eval scores the in-domain and both out-of-domain texts; --base-model auto (the base model recorded
    at pruning) adds each text's dense perplexity and the ratio, checked against a brute-force loss on the same
    windows of each text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_olica.evaluation import held_out_text

    results = tmp_path / "eval.json"
    assert run_cli("eval", pruned_dir, "--max-tokens", "256", "--sequence-length", "64", "--base-model", "auto",
                   "--output-json", results) == 0
    entries = json.loads(results.read_text())["evaluations"]
    assert [entry["dataset"] for entry in entries] == ["pride-and-prejudice", "licenses", "python-stdlib"]
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    dense = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    out = capsys.readouterr().out
    for entry in entries:
        token_ids = tokenizer(held_out_text(entry["dataset"]), add_special_tokens=False)["input_ids"][:256]
        expected_dense = _brute_force_perplexity(dense, token_ids, 64)
        expected = _brute_force_perplexity(pruned, token_ids, 64)
        assert entry["num_tokens"] == 256 and entry["base_model"] == str(base_model_dir)
        assert entry["value"] == pytest.approx(expected, rel=1e-4)
        assert entry["dense_value"] == pytest.approx(expected_dense, rel=1e-4)
        assert entry["ratio_to_dense"] == pytest.approx(expected / expected_dense, rel=1e-4)
        assert f"on {entry['dataset']} (256 tokens, windows of 64), {entry['ratio_to_dense']:.3f}x dense" in out
    assert len({entry["dense_value"] for entry in entries}) == 3  # three different texts, not one scored thrice


def test_eval_refuses_an_unknown_text_before_loading_the_model(pruned_dir, capsys):
    assert run_cli("eval", pruned_dir, "--dataset", "pride-and-prejudice,licences") == 1
    error = _one_line_error(capsys.readouterr())
    assert "Unknown evaluation text 'licences'" in error and "Did you mean 'licenses'?" in error


def test_eval_base_model_auto_needs_a_recorded_base_model(base_model_dir, capsys):
    assert run_cli("eval", base_model_dir, "--base-model", "auto") == 1  # a dense model records no base model
    error = _one_line_error(capsys.readouterr())
    assert "--base-model auto reads the base model from MODEL's olica_report.json" in error
    assert "Pass --base-model FOLDER_OR_HUB_ID." in error


def test_eval_zero_shot_on_the_bundled_task(pruned_dir, tmp_path):
    pytest.importorskip("lm_eval")
    results = tmp_path / "eval.json"
    code = run_cli("eval", pruned_dir, "--tasks", "austen_cloze", "--limit", "4", "--no-perplexity",
                   "--output-json", results)
    assert code == 0
    entries = json.loads(results.read_text())["evaluations"]
    accuracy = next(entry for entry in entries if entry["metric"] == "acc")
    assert accuracy["task"] == "austen_cloze" and accuracy["num_samples"] == 4
    assert accuracy["value"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_eval_tasks_without_lm_eval_says_how_to_install_it(pruned_dir, monkeypatch, capsys):
    for name in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lm_eval` fail as if it were not installed
    assert run_cli("eval", pruned_dir, "--tasks", "austen_cloze", "--no-perplexity") == 1
    assert "pip install 'optimum-olica[eval]'" in _one_line_error(capsys.readouterr())


def test_every_config_field_has_a_flag_and_no_flag_means_the_default():
    import argparse

    parser = argparse.ArgumentParser()
    OlicaPruneCommand.parse_args(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in dataclasses.fields(OlicaConfig):
        if field.name != "format_version":
            assert config_flag_name(field.name) in flags, field.name
    assert recipe_from_args(parser.parse_args(["model", "out"])) == OlicaConfig()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--refit-damping", "none"], {"refit_damping": None}),
        (["--refit-damping", "auto"], {"refit_damping": "auto"}),
        (["--refit-damping", "0.5"], {"refit_damping": 0.5}),
        (["--skip-layers", "0,3"], {"skip_layers": [0, 3]}),
        (["--dataset", "corpus.txt", "--num-samples", "4"], {"calibration_source": "corpus.txt", "num_samples": 4}),
        (["--self-calibration", "0.5"], {"self_calibration": 0.5}),
        (["--self-calibration", "auto"], {"self_calibration": "auto"}),
        (["--qk-ratio", "0.3", "--streaming", "--statistics-dtype", "float32"],
         {"qk_ratio": 0.3, "statistics_dtype": "float32"}),
        (["--device", "cuda:1", "--offload-activations"], {}),  # settings of the run, not of the recipe
    ],
)
def test_config_flags_parse_to_config_values(flags, expected):
    import argparse

    parser = argparse.ArgumentParser()
    OlicaPruneCommand.parse_args(parser)
    assert recipe_from_args(parser.parse_args(["model", "out", *flags])) == OlicaConfig(**expected)


def test_dry_run_plans_the_run_the_flags_describe(base_model_dir, tmp_path, capsys):
    from transformers import AutoConfig

    from optimum_olica.memory_plan import plan_memory

    flags = ["--dry-run", "--streaming", "--offload-activations", "--device", "cuda:1"]
    assert run_cli("prune", base_model_dir, tmp_path / "out", *flags) == 0
    model_config = AutoConfig.from_pretrained(base_model_dir)
    expected = plan_memory(model_config, OlicaConfig(), device="cuda", streaming=True, offload_activations=True)
    assert capsys.readouterr().out.strip() == str(expected).strip()
    assert str(expected) != str(plan_memory(model_config, OlicaConfig(), device="cuda"))  # the flags matter
    assert not (tmp_path / "out").exists()


def _one_line_error(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_bad_ratio_exits_1_with_one_line(base_model_dir, tmp_path, capsys):
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--ratio", "1.5") == 1
    line = _one_line_error(capsys.readouterr())
    assert line.startswith("optimum-cli olica prune: error:") and "ratio" in line
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    # The model does not exist: the error must be about OUTPUT, which is checked first.
    assert run_cli("prune", tmp_path / "no-such-model", output) == 1
    line = _one_line_error(capsys.readouterr())
    assert "not empty" in line and "--overwrite" in line
    assert (output / "keep.txt").read_text() == "mine"


def test_missing_model_exits_1_with_one_line(tmp_path, capsys):
    assert run_cli("prune", tmp_path / "no-such-model", tmp_path / "out") == 1
    assert "no-such-model" in _one_line_error(capsys.readouterr())


def test_inspect_refuses_a_folder_that_is_not_an_olica_checkpoint(base_model_dir, capsys):
    assert run_cli("inspect", base_model_dir) == 1
    line = _one_line_error(capsys.readouterr())
    assert "is not an Olica checkpoint" in line and "olica_config.json" in line


def test_inspect_refuses_a_report_the_pruner_did_not_write(pruned_dir, tmp_path, capsys):
    import shutil

    damaged = Path(shutil.copytree(pruned_dir, tmp_path / "damaged"))
    report = json.loads((damaged / "olica_report.json").read_text())
    del report["timings"]
    (damaged / "olica_report.json").write_text(json.dumps(report))
    assert run_cli("inspect", damaged) == 1
    assert "lacks ['timings']" in _one_line_error(capsys.readouterr())
    (damaged / "olica_report.json").write_text("{not json")
    assert run_cli("inspect", damaged) == 1
    assert "is not valid JSON" in _one_line_error(capsys.readouterr())


def test_eval_with_nothing_to_do_exits_1(pruned_dir, capsys):
    assert run_cli("eval", pruned_dir, "--no-perplexity") == 1
    assert "Nothing to evaluate" in _one_line_error(capsys.readouterr())


@pytest.mark.parametrize("flag", [["--private"], ["--base-model", "org/base"]])
def test_hub_flags_without_push_to_hub_are_refused(flag, tmp_path, capsys):
    assert run_cli("prune", tmp_path / "model", tmp_path / "out", *flag) == 1
    assert f"{flag[0]} only applies with --push-to-hub" in _one_line_error(capsys.readouterr())


def test_verbose_shows_the_exception_instead(base_model_dir, tmp_path):
    with pytest.raises(ValueError, match="ratio"):
        main(["prune", str(base_model_dir), str(tmp_path / "out"), "--ratio", "1.5", "--verbose"])


def test_unknown_flag_is_a_usage_error(capsys):
    assert run_cli("prune", "model", "out", "--no-such-flag") == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


# -- Messages that name the command line's own fix ----------------------------------------------------------------


@pytest.fixture
def model_loading_forbidden(monkeypatch):
    """Fails the test if MODEL's weights are loaded: the check under test must come before (seconds, not minutes)."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def weights_only_dir(base_model_dir, tmp_path) -> Path:
    """The base model's folder without its tokenizer files."""
    import shutil

    return Path(shutil.copytree(base_model_dir, tmp_path / "weights-only", ignore=shutil.ignore_patterns("tokenizer*")))


@pytest.mark.parametrize("command, purpose", [("prune", "calibration"), ("eval", "evaluation")])
def test_a_model_without_tokenizer_is_refused_before_loading_naming_the_flag(
    command, purpose, weights_only_dir, tmp_path, capsys, model_loading_forbidden
):
    output = [tmp_path / "out", *FAST_RECIPE] if command == "prune" else []
    assert run_cli(command, weights_only_dir, *output) == 1
    line = _one_line_error(capsys.readouterr())
    assert f"{str(weights_only_dir)!r} holds no tokenizer" in line
    assert f"the {purpose} text must be tokenized: pass --tokenizer FOLDER_OR_HUB_ID" in line
    assert "tokenizer=" not in line and "sentencepiece" not in line  # no Python-only advice, no converter story


def test_tokenizer_flag_prunes_a_model_folder_without_one(weights_only_dir, base_model_dir, tmp_path):
    output = tmp_path / "out"
    assert run_cli("prune", weights_only_dir, output, "--tokenizer", base_model_dir, *FAST_RECIPE) == 0
    assert (output / "tokenizer.json").read_text() == (base_model_dir / "tokenizer.json").read_text()


@pytest.fixture(scope="module")
def two_column_jsonl(tmp_path_factory) -> Path:
    from optimum_olica.data import bundled_calibration_text

    text = bundled_calibration_text()
    path = tmp_path_factory.mktemp("data") / "articles.jsonl"
    rows = [{"title": f"part {index}", "body": text[index * 2000 : (index + 1) * 2000]} for index in range(50)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_two_string_columns_ask_for_the_text_column_flag(
    base_model_dir, two_column_jsonl, tmp_path, capsys, model_loading_forbidden
):
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--dataset", two_column_jsonl, *FAST_RECIPE) == 1
    line = _one_line_error(capsys.readouterr())
    assert "holds the text" in line and "Pass --text-column NAME with one of ['title', 'body']" in line
    assert "text_column=" not in line
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--dataset", two_column_jsonl, "--text-column",
                   "content", *FAST_RECIPE) == 1
    line = _one_line_error(capsys.readouterr())
    assert "--text-column 'content' is not a column" in line and "text_column=" not in line


def test_text_column_flag_calibrates_on_that_column_and_records_it(base_model_dir, two_column_jsonl, tmp_path):
    output = tmp_path / "out"
    assert run_cli("prune", base_model_dir, output, "--dataset", two_column_jsonl, "--text-column", "body",
                   *FAST_RECIPE) == 0
    report = json.loads((output / "olica_report.json").read_text())
    assert report["calibration_data"]["source"] == f"{two_column_jsonl} (text column 'body')"


def test_an_empty_jsonl_is_called_empty(base_model_dir, tmp_path, capsys, model_loading_forbidden):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--dataset", empty, *FAST_RECIPE) == 1
    line = _one_line_error(capsys.readouterr())
    assert f"Calibration file {str(empty)!r} is empty" in line and "'austen'" in line
    assert "StopIteration" not in line


@pytest.mark.parametrize("spelling", ["absolute", "dot", "inside an existing folder"])
def test_a_mistyped_local_path_is_no_such_folder(spelling, base_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(base_model_dir.parent)
    name = base_model_dir.name
    typo = {"absolute": f"{base_model_dir}x", "dot": f"./{name}x", "inside an existing folder": f"{name}/{name}"}
    assert run_cli("prune", typo[spelling], tmp_path / "out") == 1
    line = _one_line_error(capsys.readouterr())
    assert f"No such folder: {typo[spelling]!r}" in line and "Repo id" not in line
    if spelling != "inside an existing folder":
        assert f"Did you mean {str(base_model_dir) if spelling == 'absolute' else './' + name!r}?" in line


def _last_line_error(captured) -> str:
    assert "Traceback" not in captured.err
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("optimum-cli olica prune: error:"), captured.err
    return line


def test_too_high_a_ratio_advises_only_what_can_reach_it(base_model_dir, tmp_path, capsys):
    # Exact widths: at the default multiple of 8, head_dim 16 allows value heads of 8 or 16 only, and vo_ratio 0.35
    # and 0.99 both give 8 (the default case is the last one below).
    exact = [*FAST_RECIPE, "--dimension-multiple", "1"]
    # The reference split already puts qk_ratio at 0.99: only vo_ratio can go higher, and no cut of attention
    # reaches 99% (the embeddings are never pruned).
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--ratio", "0.99", *exact) == 1
    line = _last_line_error(capsys.readouterr())  # after the "Loading weights" bar: the plan needs the model
    assert "qk_ratio=0.99" in line and "Lower the ratio to at most" in line
    assert "pruning attention harder is not enough: vo_ratio at 0.99 would allow at most" in line
    assert "raise qk_ratio" not in line and "prune attention harder:" not in line
    # 70%: within what a harder V/O cut allows, so that is advised, and it works.
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--ratio", "0.7", *exact) == 1
    line = _last_line_error(capsys.readouterr())
    assert "or prune attention harder: raise vo_ratio (up to 0.99" in line and "qk_ratio (up to" not in line
    assert run_cli("prune", base_model_dir, tmp_path / "out", "--ratio", "0.7", "--vo-ratio", "0.99", *exact) == 0
    # At the default multiple a harder V/O cut changes nothing (8 channels either way): the rounding is named.
    assert run_cli("prune", base_model_dir, tmp_path / "default", "--ratio", "0.7", *FAST_RECIPE) == 1
    line = _last_line_error(capsys.readouterr())
    assert "8 of 16 channels, not 11" in line and "or lower dimension_multiple=8" in line
    assert "prune attention harder:" not in line


# -- Through the real optimum-cli executable ----------------------------------------------------------------------


# Other packages' import-time lines are dropped before our messages are checked (conftest.UPSTREAM_NOISE).


def _cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(OPTIMUM_CLI), *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result.stderr = without_upstream_noise(result.stderr)
    return result


def test_optimum_cli_help_lists_olica_without_importing_torch():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert "olica" in result.stdout and "Olica structured pruning" in result.stdout
    # The stand-in registered for `optimum-cli --help` says what the real command says.
    from optimum.commands.register import register_olica

    from optimum_olica.commands import OlicaCommand

    assert register_olica.OlicaCommand is not OlicaCommand  # pytest's argv does not ask for olica
    assert register_olica.OlicaCommand.COMMAND == OlicaCommand.COMMAND
    # optimum-cli imports every register file at each start: ours must stay light when olica is not asked for.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, optimum.commands.register.register_olica as r; "
         "print(r.REGISTER_COMMANDS[0].COMMAND.name, 'torch' in sys.modules, 'optimum_olica' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert probe.stdout.split() == ["olica", "False", "False"], probe.stderr


def test_optimum_cli_olica_inspect_and_its_errors(pruned_dir, base_model_dir):
    result = _cli("olica", "inspect", pruned_dir)
    assert result.returncode == 0, result.stderr
    assert "Per layer (olica_report.json):" in result.stdout

    result = _cli("olica", "inspect", base_model_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not an Olica checkpoint" in lines[0], result.stderr
