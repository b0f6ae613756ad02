"""The benchmark scripts' shared pieces: the random checkpoints they build and the page they generate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402


def test_random_checkpoint_is_written_layer_by_layer_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    shape = common.LlamaShape(hidden_size=64, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=256)
    directory = common.random_llama_checkpoint(shape, "bfloat16", directory=tmp_path / "model")
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) == shape.num_hidden_layers + 1  # one shard per layer, one for the rest
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2 * shape.num_parameters()
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.dtype == torch.bfloat16
    assert model.num_parameters() == shape.num_parameters()
    weight = model.model.layers[1].mlp.up_proj.weight.detach().float()
    assert 0.015 < float(weight.std()) < 0.025  # N(0, 0.02), not left uninitialised
    assert (directory / ".complete").exists()
    # Built once: a second call reuses the files.
    before = shards[0].stat().st_mtime_ns
    common.random_llama_checkpoint(shape, "bfloat16", directory=directory)
    assert shards[0].stat().st_mtime_ns == before


def _fake_results(quick: bool) -> dict[str, dict]:
    record = {"command": "python bench/x.py", "date": "2026-01-01 00:00 UTC", "quick": quick,
              "environment": {"cpu": "Test CPU", "cores": 2, "ram_gib": 8.0, "python": "3.11", "torch": "2"}}
    quality_rows = [{"variant": "dense", "ratio": 0.0, "parameters": 100, "perplexity": 10.0}]
    for ratio, ppl in ((0.2, 12.0), (0.33, 15.0)):
        for variant, factor in (("olica", 1.0), ("olica_exact", 1.01), ("magnitude", 1e5)):
            quality_rows.append({"variant": variant, "ratio": ratio, "parameters": 80, "achieved_ratio": ratio,
                                 "perplexity": ppl * factor, "prune_over_dense_forward": 3.0,
                                 "timings": {"decomposition_s": 1.0}})
    speed_row = {"parameters": 80, "prefill_b1_tokens_per_s": 110.0, "prefill_b8_tokens_per_s": 120.0,
                 "decode_tokens_per_s": 11.0, "kv_bytes_per_token_config": 900, "kv_bytes_per_token_measured": 900.0,
                 "kv_fraction_of_dense": 0.9, "params_ratio": 1.25, "decode_speedup": 1.1,
                 "decode_target_speedup": 1.125, "decode_speedup_over_target": 1.1 / 1.125,
                 "prefill_b1_speedup": 1.1, "prefill_b8_speedup": 1.2}
    large_row = {"parameters": 800, "prefill_b1_tokens_per_s": 50.0, "decode_tokens_per_s": 2.4,
                 "decode_ms_per_token": 1000 / 2.4, "linear_ms_per_token": 396.0, "other_ms_per_token": 1000 / 2.4 - 396,
                 "kv_bytes_per_token_config": 900, "kv_bytes_per_token_measured": 900.0, "kv_fraction_of_dense": 0.9,
                 "params_ratio": 1.25, "decode_speedup": 1.2, "decode_target_speedup": 1.125,
                 "decode_speedup_over_target": 1.2 / 1.125, "linear_speedup": 480 / 396, "prefill_b1_speedup": 1.22}
    return {
        "cost": {**record, "protocol": {"model": "m", "calibration": "128 x 128 tokens, seed 0", "ratio": 0.2,
                                        "floor": "f"},
                 "prune_s": 30.0, "dense_forward_s": [10.0, 10.0, 10.0], "dense_forward_median_s": 10.0,
                 "prune_over_dense_forward": 3.0, "target_ratio": 2.5,
                 "phase_seconds": {"capture": 0, "load": 0, "statistics": 8, "decomposition": 2, "refit": 12,
                                   "propagation": 7, "store": 0},
                 "phase_shares": {"capture": 0, "load": 0, "statistics": 8 / 30, "decomposition": 2 / 30,
                                  "refit": 0.4, "propagation": 7 / 30, "store": 0, "other": 1 / 30}},
        "memory": {**record, "protocol": {"model": "random-initialised Llama, 1.48B parameters, float32",
                                          "calibration": "c", "ratio": 0.2, "measure": "m"},
                   "checkpoint_bytes": 6 * 2**30, "parameters": 1_480_000_000, "target_streaming_ratio": 0.35,
                   "runs": [{"mode": "streaming", "peak_rss_bytes": 2**30, "polled_peak_rss_bytes": 2**30,
                             "baseline_rss_bytes": 2**28, "peak_over_checkpoint": 1 / 6, "total_s": 100.0},
                            {"mode": "loaded", "peak_rss_bytes": 7 * 2**30, "polled_peak_rss_bytes": 7 * 2**30,
                             "baseline_rss_bytes": 2**28, "peak_over_checkpoint": 7 / 6, "total_s": 90.0}]},
        "speed": {**record, "protocol": {"model": "m", "pruned_models": "p", "prefill": "p", "decode": "d",
                                         "rounds": 5, "statistic": "median"},
                  "rows": [{**speed_row, "model": "dense", "parameters": 100, "kv_fraction_of_dense": 1.0,
                            "kv_bytes_per_token_config": 1000, "kv_bytes_per_token_measured": 1000.0},
                           {**speed_row, "model": "olica 20%"}]},
        "speed_large": {**record, "protocol": {"model": "random-initialised Llama, 1.48B parameters (float32, CPU)",
                                               "pruned_models": "p", "prefill": "p", "decode": "d", "rounds": 3,
                                               "statistic": "median"},
                        "rows": [{**large_row, "model": "dense", "parameters": 1000, "decode_tokens_per_s": 2.0,
                                  "decode_ms_per_token": 500.0, "linear_ms_per_token": 480.0,
                                  "other_ms_per_token": 20.0, "kv_fraction_of_dense": 1.0},
                                 {**large_row, "model": "olica 20%"}]},
        "quality": {**record, "protocol": {"model": "m", "calibration": "c", "evaluation": "e"}, "complete": True,
                    "variants": {"olica": "Olica", "olica_exact": "exact", "magnitude": "baseline"},
                    "rows": quality_rows},
        "gpu": {**record, "gpu_run": False, "reason": "no CUDA device on this machine",
                "targets": {"wall_s": 90.0, "peak_gpu_bytes": 2e9, "perplexity_relative_gap": 0.01},
                "protocol": {"model": "7B", "calibration": "256 x 128"}},
    }


def test_report_renders_every_figure_with_its_target(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "QUICK_DOC", tmp_path / "benchmarks_quick.md")
    monkeypatch.setattr(report, "QUICK_PLOT", tmp_path / "plot.png")
    for name, results in _fake_results(quick=True).items():
        (tmp_path / f"{name}_quick.json").write_text(json.dumps(results))
    text = report.main(["--quick"]).read_text()
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "| Pruning time / one dense forward (SmolLM2, 20%, 128 x 128 tokens) | <= 2.5 | 3.00x | 1.20 | **no** |" in text
    assert "| Streaming peak RSS / checkpoint on disk (1.48B parameters) | <= 0.35 | 0.167 | 0.48 | yes |" in text
    assert "| Decode speedup, olica 20% (batch 1, 128 tokens) | >= 1.125 (0.9 x 1.250) | 1.100x | 0.98 | **no** |" in text
    assert "| Decode speedup, 1.48B Llama, olica 20% (batch 1, 128 tokens) | >= 1.125 (0.9 x 1.250) | 1.200x | 1.07 | yes |" in text
    assert "| Prefill speedup, 1.48B Llama, olica 20%, batch 1 | report | 1.220x | - | - |" in text
    # The decode anatomy of the large run: step = linear layers + rest, and the sentence that explains it.
    assert "| 500.0: 480.0 + 20.0 |" in text
    assert "take 480.0 of 500.0 ms per token (96.0%)" in text
    assert "linear layers 1.21x faster (parameter ratio 1.25), rest 20.7 ms, whole step 1.20x" in text
    assert "not run (no CUDA device where bench/gpu.py ran)" in text
    assert "The GPU benchmark was not run" in text
    assert "largest remaining cost is the **refit** phase" in text
    assert "| olica_exact | 33% |" in text and "1.50e+06" in text  # magnitude's perplexity in scientific notation


def _render_quick_report(tmp_path, monkeypatch, results: dict[str, dict]) -> str:
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "QUICK_DOC", tmp_path / "benchmarks_quick.md")
    monkeypatch.setattr(report, "QUICK_PLOT", tmp_path / "plot.png")
    monkeypatch.setattr(report, "plot_quality", lambda quality, path: False)  # the plot is tested above
    for name, data in results.items():
        (tmp_path / f"{name}_quick.json").write_text(json.dumps(data))
    return report.main(["--quick"]).read_text()


def test_report_shows_out_of_domain_perplexity_as_a_ratio_to_dense(tmp_path, monkeypatch):
    """Rows that measured the out-of-domain texts show each as a ratio to the dense row's; rows from before show
    "not measured", never a figure; the across-domains run gets its own section, summary row and closing sentence."""
    results = _fake_results(quick=True)
    rows = results["quality"]["rows"]
    rows[0]["out_of_domain_perplexity"] = {"licenses": 20.0, "python-stdlib": 4.0}
    rows[1]["out_of_domain_perplexity"] = {"licenses": 40.0, "python-stdlib": 6.0}  # olica 20%
    text = _render_quick_report(tmp_path, monkeypatch, results)
    assert "| licenses / dense | python-stdlib / dense |" in text
    assert "| dense | - | 100 | 0% | 10.00 | - | - | ppl 20.00 | ppl 4.00 |" in text
    assert "| olica | 20% | 80 | 20.00% | 12.00 | 3.00x | 1.0 | 2.00x | 1.50x |" in text
    assert "| olica_exact | 20% | 80 | 20.00% | 12.12 | 3.00x | 1.0 | not measured | not measured |" in text
    assert "Not measured yet: run `python bench/quality.py --quick --variants olica --ratios 0.2 " in text

    dense = {"variant": "dense", "ratio": 0.0, "parameters": 100, "perplexity": 10.0,
             "out_of_domain_perplexity": {"licenses": 20.0, "python-stdlib": 4.0}}
    olica = {"variant": "olica", "ratio": 0.2, "parameters": 80, "perplexity": 12.5,
             "out_of_domain_perplexity": {"licenses": 41.0, "python-stdlib": 5.0}}
    results["quality_domains"] = {**results["quality"], "rows": [dense, olica],
                                  "protocol": {"model": "m", "calibration": "c", "evaluation": "e", "out_of_domain": "o"}}
    text = _render_quick_report(tmp_path, monkeypatch, results)
    assert "## Quality across domains" in text
    assert "| dense | - | 100 | ppl 10.00 | ppl 20.00 | ppl 4.00 |" in text
    assert "| olica | 20% | 80 | 1.25x | 2.05x | 1.25x |" in text
    assert ("| Perplexity / dense, olica 20%: Pride and Prejudice / licenses / python-stdlib | report | "
            "1.25x / 2.05x / 1.25x | - | - |") in text
    assert "olica at 20% is at 1.25x dense perplexity in domain and 2.05x / 1.25x on licenses / python-stdlib" in text


def test_quality_resume_keeps_rows_measured_before_the_out_of_domain_texts(tmp_path, monkeypatch):
    import argparse

    import quality

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(quality, "results_path", common.results_path)
    args = argparse.Namespace(num_samples=128, sequence_length=128, ood_tokens=16384, results="quality", quick=False)
    evaluation = torch.zeros(1, 32768, dtype=torch.long)
    protocol = quality._protocol(args, evaluation)
    old_protocol = {key: value for key, value in protocol.items() if key != "out_of_domain"}
    rows = [{"variant": "dense", "ratio": 0.0, "parameters": 1, "perplexity": 2.0}]
    (tmp_path / "quality.json").write_text(json.dumps({"protocol": old_protocol, "rows": rows}))
    assert quality._previous_rows(args, evaluation) == rows
    (tmp_path / "quality.json").write_text(json.dumps({"protocol": {**protocol, "out_of_domain": "other"},
                                                       "rows": rows}))
    with pytest.raises(SystemExit, match="another protocol"):
        quality._previous_rows(args, evaluation)


def test_report_renders_a_gpu_run_next_to_the_memory_plan(tmp_path, monkeypatch):
    """The page of a GPU run of bench/gpu.py: the plans' per-phase accelerator bytes beside the measured phase peaks,
    the decode table of the three variants, what was skipped and why SmolLM2 was not compared."""
    pytest.importorskip("matplotlib")
    import gpu

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "QUICK_DOC", tmp_path / "benchmarks_quick.md")
    monkeypatch.setattr(report, "QUICK_PLOT", tmp_path / "plot.png")
    results = _fake_results(quick=True)
    plans = [gpu.plan_figures(name, shape, 256, 128, offload)
             for name, shape in (("8B", gpu.LLAMA_3_8B), ("70B", gpu.LLAMA_3_70B)) for offload in (False, True)]
    run = {"offload_activations": False, "wall_s": 80.0, "peak_gpu_bytes": 2.6e9, "achieved_ratio": 0.2,
           "phase_peak_gpu_bytes": {name: 1.5e9 for name in plans[0]["phases"]}}
    run["phase_peak_gpu_bytes"]["down_proj refit"] = 2.6e9
    ms = {"1024": 10.0, "8192": 12.0}
    results["gpu"] = {
        **results["gpu"], "gpu_run": True, "gpu": "Test GPU", "plans": plans, "skipped": ["8B prune with offload"],
        "targets": {"wall_s": 90.0, "peak_gpu_bytes": 2.5e9, "plan_70b_peak_gpu_bytes": 10e9,
                    "perplexity_relative_gap": 0.01},
        "llama3_8b_streaming": [run],
        "decode": {"steps": 64, "attention": "sdpa", "pruned_value_head_dims": [112], "head_dim": 128,
                   "ms_per_step": {"dense": ms, "pruned_padded": ms, "pruned_unpadded": {"1024": 9.0, "8192": 8.5}}},
        "smollm2_cpu_vs_gpu": {"measured": False, "reason": "SmolLM2 not available here (test)"},
    }
    for name, data in results.items():
        (tmp_path / f"{name}_quick.json").write_text(json.dumps(data))
    text = report.main(["--quick"]).read_text()
    down = {(plan["name"], plan["offload_activations"]): plan["phases"]["down_proj refit"]["device_bytes"] for plan in plans}
    assert (f"| down_proj refit | {report._gb(down['8B', False])} | 2.60 GB | {report._gb(down['8B', True])} | not measured"
            f" | {report._gb(down['70B', False])} | {report._gb(down['70B', True])} |") in text
    assert "| pruned, value heads unpadded | 9.00 | 8.50 |" in text
    assert "| 8B streaming wall time (activations on GPU) | < 90 s | 80.0 s | 0.89 | yes |" in text
    assert "| 8B streaming peak GPU memory (activations on GPU) | < 2.50 GB | 2.60 GB | 1.04 | **no** |" in text
    assert "| Plan: 70B-shape peak accelerator memory, one layer (activations on GPU) | <= 10.00 GB | " in text
    assert "Skipped in this run: 8B prune with offload." in text
    assert "SmolLM2 CPU vs GPU: not measured (SmolLM2 not available here (test))." in text


def test_screening_section_shows_every_variant_as_ratios_to_dense_with_its_command():
    record = _fake_results(quick=False)["quality"]
    screen = {**record, "protocol": {"eval_tokens": 8192, "calibration": "c", "threads": 1},
              "variants": {"mixed": {"description": "half and half", "calibration": [], "arrangement": "interleave",
                                     "overrides": {}}},
              "rows": [{"variant": "dense", "perplexity": {"pride_and_prejudice": 10.0, "licenses": 20.0,
                                                           "python-stdlib": 4.0}, "command": "python bench/s.py a"},
                       {"variant": "mixed", "ratio": 0.2, "num_sequences": 128, "overrides": {"refit_damping": 1.0},
                        "perplexity": {"pride_and_prejudice": 12.0, "licenses": 30.0, "python-stdlib": 5.0},
                        "prune_s": 100.4, "generation_s": 70.6, "command": "python bench/s.py b"}]}
    text = report.screening_section(screen, quick=False)
    assert "| dense | - | - | - | ppl 10.00 | ppl 20.00 | ppl 4.00 | - | - |" in text
    assert "| mixed | 20% | 128 | refit_damping=1.0 | 1.20x | 1.50x | 1.25x | 100 | 71 |" in text
    assert "- `mixed`: half and half." in text
    assert "- `python bench/s.py a`\n- `python bench/s.py b`" in text
    assert report.screening_section(None, quick=False).startswith("## Calibration variants screened")
    screen["rows"].insert(1, {**screen["rows"][1], "variant": "austen",
                              "perplexity": {"pride_and_prejudice": 11.0, "licenses": 40.0, "python-stdlib": 5.0}})
    screen["rows"].append({**screen["rows"][2], "ratio": 0.33, "perplexity": {"pride_and_prejudice": 1.0,
                                                                            "licenses": 1.0, "python-stdlib": 1.0}})
    # The 33% row has no Austen row at its ratio: it must not be compared with the 20% one.
    assert report._screening_verdicts(screen).endswith(
        "`mixed` at 20% better on licenses, not better on pride_and_prejudice, python-stdlib.")
