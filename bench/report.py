"""Regenerate docs/benchmarks.md (and its plot) from bench/results/*.json; nothing in it is typed by hand.

Every bench script calls this at the end; it can also be run alone. Quick runs (``--quick``) read the ``*_quick.json``
files and write bench/results/benchmarks_quick.md and its plot instead, so a smoke run never touches the page.

    python bench/report.py            # docs/benchmarks.md + docs/img/quality_perplexity.png
    python bench/report.py --quick    # bench/results/benchmarks_quick.md + bench/results/quality_perplexity_quick.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, results_path  # noqa: E402

from optimum_olica.evaluation import OUT_OF_DOMAIN_SOURCES  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "quality_perplexity.png"
QUICK_DOC = ROOT / "bench" / "results" / "benchmarks_quick.md"
QUICK_PLOT = ROOT / "bench" / "results" / "quality_perplexity_quick.png"
PHASES = ("capture", "allocation", "load", "statistics", "decomposition", "refit", "propagation", "store", "other")
# bench/quality.py --results quality_domains: a few rows measured on every text, beside the full table.
DOMAINS_RESULTS = "quality_domains"
# bench/quality.py --variants olica,olica_stock --results quality_deployment: the stock recipe beside Olica.
DEPLOYMENT_RESULTS = "quality_deployment"
# bench/quality.py --variants olica,olica_multiple_1,... --results quality_multiples: dimension_multiple's cost.
MULTIPLES_RESULTS = "quality_multiples"
# bench/calibration_screen.py: the calibration and refit variants of issue 15 on a cheaper protocol.
SCREEN_RESULTS = "calibration_screen"
# bench/quality.py --variants olica,olica_uniform --results quality_allocation: the adaptive allocation's full run.
ALLOCATION_RESULTS = "quality_allocation"
# bench/quality.py --variants olica_trajectory,olica_self_calibrated_trajectory --results quality_trajectory: the refits
# aimed halfway to the dense model's own hidden states (trajectory_weight=0.5), beside the default's rows.
TRAJECTORY_RESULTS = "quality_trajectory"
# bench/quality.py --variants olica_plus_self_generated --results quality_own_data: what self_calibration='auto' adds
# to data of one's own.
OWN_DATA_RESULTS = "quality_own_data"
# bench/quality.py --variants olica,olica_plus_self_generated --results quality_covariance: Q/K factored under the
# attention input's correlations shrunk halfway to the diagonal (qk_covariance_shrinkage=0.5, the default since).
COVARIANCE_RESULTS = "quality_covariance"
# bench/quality.py --variants olica,olica_plus_self_generated,olica_self_calibrated --results quality_attention: V/O
# reduced under o_proj's input correlations and Q/K weighed by the attention scores (the defaults since).
ATTENTION_RESULTS = "quality_attention"
# bench/allocation_screen.py: the ways of sharing the FFN between layers, on the screening protocol.
ALLOCATION_SCREEN_RESULTS = "allocation_screen"
VARIANT_ORDER = ("olica", "olica_no_lc", "olica_branch_only", "olica_refit_and_branch", "olica_exact", "magnitude")


def _load(name: str, quick: bool) -> dict | None:
    path = results_path(name, quick)
    return json.loads(path.read_text()) if path.exists() else None


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _provenance(results: dict) -> str:
    env = results.get("environment", {})
    machine = env.get("cpu") or env.get("processor") or env.get("machine", "?")
    if env.get("cores"):
        machine += f", {env['cores']} cores"
    if env.get("ram_gib"):
        machine += f", {env['ram_gib']} GiB RAM"
    if env.get("gpu"):
        machine += f", {env['gpu']['name']}"
    versions = ", ".join(f"{key} {env[key]}" for key in ("python", "torch", "transformers", "optimum_olica")
                         if env.get(key))
    date = results.get("date", "date not recorded")
    return f"Measured {date} on {machine} ({versions}) with `{results.get('command', '?')}`."


def _missing(script: str, quick: bool) -> str:
    flag = " --quick" if quick else ""
    return f"Not measured yet: run `python bench/{script}{flag}`.\n"


# ---- the summary table ------------------------------------------------------------------------------------------


def _model_size(speed: dict) -> str:
    """"1.48B" from the protocol's model description of the large speed run."""
    return speed["protocol"]["model"].split(",")[1].split()[0]


def _speed_summary_rows(speed: dict, label: str) -> list[tuple[str, str, str, str, str]]:
    rows = []
    dense_kv = speed["rows"][0]["kv_bytes_per_token_config"]
    for row in speed["rows"][1:]:
        target = row["decode_target_speedup"]
        rows.append((f"Decode speedup, {label}{row['model']} (batch 1, 128 tokens)",
                     f">= {target:.3f} (0.9 x {row['params_ratio']:.3f})", f"{row['decode_speedup']:.3f}x",
                     f"{row['decode_speedup_over_target']:.2f}", _verdict(row["decode_speedup"] >= target)))
        batches = [key for key in ("prefill_b1", "prefill_b8") if f"{key}_speedup" in row]
        rows.append((f"Prefill speedup, {label}{row['model']}, "
                     + " / ".join(key.replace("prefill_b", "batch ") for key in batches), "report",
                     " / ".join(f"{row[f'{key}_speedup']:.3f}x" for key in batches), "-", "-"))
        rows.append((f"KV-cache bytes per token, {label}{row['model']} vs dense", "report",
                     f"{row['kv_bytes_per_token_config']:,} vs {dense_kv:,} ({_pct(row['kv_fraction_of_dense'])})",
                     "-", "-"))
    return rows


def _domain_summary_rows(domains) -> list[tuple[str, str, str, str, str]]:
    """Each pruned row of the across-domains run: its perplexity on every text as a ratio to dense."""
    dense = next(row for row in domains["rows"] if row["variant"] == "dense")
    rows = []
    for row in domains["rows"]:
        if row is dense:
            continue
        ratios = [f"{row['perplexity'] / dense['perplexity']:.2f}x", *_out_of_domain_cells(row, dense)]
        rows.append((f"Perplexity / dense, {row['variant']} {100 * row['ratio']:.0f}%: Pride and Prejudice / "
                     + " / ".join(OUT_OF_DOMAIN_SOURCES), "report", " / ".join(ratios), "-", "-"))
    return rows


def _current_olica_rows(quality, headline) -> list[dict]:
    """quality.json's ``olica`` rows, each replaced by the headline file's row at the same ratio where it has one (the
    same protocol, measured with the current default)."""
    current = {row["ratio"]: row for row in (headline or {}).get("rows", []) if row["variant"] == "olica"}
    return [current.get(row["ratio"], row) for row in quality["rows"] if row["variant"] == "olica"]


def summary_rows(cost, memory, speed, speed_large, quality, gpu, domains=None) -> list[tuple[str, str, str, str, str]]:
    """(figure, target, measured, measured/target, met) for every figure of the issue."""
    rows = []
    if cost:
        ratio = cost["prune_over_dense_forward"]
        rows.append(("Pruning time / one dense forward (SmolLM2, 20%, "
                     f"{cost['protocol']['calibration'].split(',')[0]})", f"<= {cost['target_ratio']}",
                     f"{ratio:.2f}x", f"{ratio / cost['target_ratio']:.2f}", _verdict(ratio <= cost["target_ratio"])))
    else:
        rows.append(("Pruning time / one dense forward", "<= 2.5", "not measured", "-", "-"))
    if memory:
        target = memory["target_streaming_ratio"]
        for run in memory["runs"]:
            value = run["peak_over_checkpoint"]
            if run["mode"] == "streaming":
                rows.append((f"Streaming peak RSS / checkpoint on disk ({memory['protocol']['model'].split(',')[1].strip()})",
                             f"<= {target}", f"{value:.3f}", f"{value / target:.2f}", _verdict(value <= target)))
            else:
                rows.append(("Fully-loaded peak RSS / checkpoint (contrast)", "-", f"{value:.3f}", "-", "-"))
    else:
        rows.append(("Streaming peak RSS / checkpoint on disk", "<= 0.35", "not measured", "-", "-"))
    if speed:
        rows += _speed_summary_rows(speed, "")
    else:
        rows.append(("Decode speedup vs 0.9 x parameter ratio", ">= 0.9 x params ratio", "not measured", "-", "-"))
    if speed_large:
        rows += _speed_summary_rows(speed_large, f"{_model_size(speed_large)} Llama, ")
    if quality:
        dense = next(row for row in quality["rows"] if row["variant"] == "dense")
        for row in _current_olica_rows(quality, domains):
            rows.append((f"Perplexity, Olica {100 * row['ratio']:.0f}% (dense {dense['perplexity']:.2f})", "report",
                         f"{row['perplexity']:.2f}", f"{row['perplexity'] / dense['perplexity']:.2f} x dense", "-"))
    if domains:
        rows += _domain_summary_rows(domains)
    for plan in (gpu or {}).get("plans", []):
        target = gpu["targets"]["plan_70b_peak_gpu_bytes" if plan["name"] == "70B" else "peak_gpu_bytes"]
        size = plan["name"]
        where = "CPU" if plan["offload_activations"] else "GPU"
        rows.append((f"Plan: {size}-shape peak accelerator memory, one layer (activations on {where})",
                     f"<= {_gb(target)}", _gb(plan["peak_device_bytes"]), f"{plan['peak_device_bytes'] / target:.2f}",
                     _verdict(plan["peak_device_bytes"] <= target)))
    if gpu and gpu.get("gpu_run"):
        targets = gpu["targets"]
        size = "8B" if "llama3_8b_streaming" in gpu else "7B"
        for run in gpu.get("llama3_8b_streaming", gpu.get("llama2_7b_streaming", [])):
            where = "CPU" if run["offload_activations"] else "GPU"
            rows.append((f"{size} streaming wall time (activations on {where})", f"< {targets['wall_s']:.0f} s",
                         f"{run['wall_s']:.1f} s", f"{run['wall_s'] / targets['wall_s']:.2f}",
                         _verdict(run["wall_s"] < targets["wall_s"])))
            rows.append((f"{size} streaming peak GPU memory (activations on {where})",
                         f"< {_gb(targets['peak_gpu_bytes'])}", _gb(run["peak_gpu_bytes"]),
                         f"{run['peak_gpu_bytes'] / targets['peak_gpu_bytes']:.2f}",
                         _verdict(run["peak_gpu_bytes"] < targets["peak_gpu_bytes"])))
        comparison = gpu.get("smollm2_cpu_vs_gpu")
        if comparison and comparison.get("measured", True):
            gap = comparison["relative_gap"]
            rows.append(("SmolLM2 20% perplexity, pruned on GPU vs CPU", f"< {_pct(comparison['target_relative_gap'])}",
                         _pct(gap), f"{gap / comparison['target_relative_gap']:.2f}",
                         _verdict(gap < comparison["target_relative_gap"])))
    else:
        reason = "no CUDA device where bench/gpu.py ran" if gpu else "bench/gpu.py has not been run"
        for figure, target in (("8B streaming wall time", "< 90 s"), ("8B streaming peak GPU memory", "< 2.5 GB"),
                               ("SmolLM2 perplexity, pruned on GPU vs CPU", "< 1%")):
            rows.append((figure, target, f"not run ({reason})", "-", "-"))
    return rows


# ---- sections ---------------------------------------------------------------------------------------------------


def cost_section(cost, quick: bool) -> str:
    lines = ["## Pruning cost against the floor", ""]
    if not cost:
        return "\n".join(lines + [_missing("cost.py", quick)])
    forward = ", ".join(f"{seconds:.1f}" for seconds in cost["dense_forward_s"])
    lines += [
        f"{cost['protocol']['model']}, ratio {cost['protocol']['ratio']}, calibration {cost['protocol']['calibration']}.",
        f"Floor: {cost['protocol']['floor']}. {_provenance(cost)}",
        "",
        "| pruning | dense forward (runs) | ratio | target |",
        "| --- | --- | --- | --- |",
        f"| {cost['prune_s']:.1f} s | {cost['dense_forward_median_s']:.1f} s ({forward}) | "
        f"{cost['prune_over_dense_forward']:.2f}x | <= {cost['target_ratio']} |",
        "",
        *_generation_lines(cost),
        "Where the pruning time goes (the report's phase timings, summed over layers):",
        "",
        "| phase | seconds | share | in floor units |",
        "| --- | --- | --- | --- |",
    ]
    phases = dict(cost["phase_seconds"])
    phases["other"] = cost["phase_shares"]["other"] * cost["prune_s"]
    for phase in PHASES:
        seconds = phases.get(phase, 0.0)
        lines.append(f"| {phase} | {seconds:.1f} | {_pct(seconds / cost['prune_s'])} | "
                     f"{seconds / cost['dense_forward_median_s']:.2f}x |")
    lines += ["", "Phases: capture = embeddings up to layer 0; allocation = the dense pass that sets the FFN widths "
              "(layer_allocation='adaptive'; 0 where the run predates it); load = reading a layer's weights; statistics = the dense "
              "layer pass with the statistics hooks; decomposition = the SVDs and scores; refit = the pass through "
              "the pruned attention for the o_proj refit, the cross-validated o_proj/down_proj refits, the refitted "
              "down_proj applied to the kept activations and, when the recipe has calibration branches, their fit; "
              "propagation = the rest of the pruned layer (the refitted o_proj on the attention values kept from "
              "the refit pass, then the FFN but down_proj) producing the next layer's inputs; store = handing the "
              "pruned layer over; other = planning, choosing the branch layers, assembling the model.", ""]
    return "\n".join(lines)


def _generation_lines(cost) -> list[str]:
    """The self-generated calibration's cost (self_calibration="auto" without data of one's own), where measured."""
    if "generation_s" not in cost:
        return []
    return [f"Generating the {cost['self_generated_samples']} sequences the default calibration has the model write "
            "when the user gives no data (self_calibration=\"auto\" with the bundled text; apart from the pruning "
            f"time): {cost['generation_s']:.1f} s, {cost['generation_over_dense_forward']:.2f}x the dense forward.",
            ""]


def memory_section(memory, quick: bool) -> str:
    lines = ["## Memory in streaming mode", ""]
    if not memory:
        return "\n".join(lines + [_missing("memory.py", quick)])
    lines += [
        f"{memory['protocol']['model']} ({memory['parameters']:,} parameters, {_gib(memory['checkpoint_bytes'])} of "
        f"safetensors), ratio {memory['protocol']['ratio']}, calibration {memory['protocol']['calibration']}. "
        f"Measure: {memory['protocol']['measure']}. {_provenance(memory)}",
        "",
        "| mode | peak RSS | polled peak | runtime after imports | peak / checkpoint | target | pruning time | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in memory["runs"]:
        target = f"<= {memory['target_streaming_ratio']}" if run["mode"] == "streaming" else "- (contrast)"
        lines.append(
            f"| {run['mode']} | {_gib(run['peak_rss_bytes'])} | {_gib(run['polled_peak_rss_bytes'])} | "
            f"{_gib(run['baseline_rss_bytes'])} | {run['peak_over_checkpoint']:.3f} | {target} | {run['total_s']:.0f} s |"
            f" {run.get('commit') or 'earlier run, not recorded'} |"
        )
    lines += ["", "\"Runtime after imports\" is the resident memory of the same process once torch, transformers and "
              "the package are imported, before any weight is read: it is part of the peak.", ""]
    return "\n".join(lines)


def _speed_table(speed: dict) -> list[str]:
    batches = [key for key in ("prefill_b1", "prefill_b8") if f"{key}_tokens_per_s" in speed["rows"][0]]
    anatomy = "linear_ms_per_token" in speed["rows"][0]
    header = ["model", "parameters", *(f"prefill {key[-2:]} tok/s" for key in batches), "decode tok/s",
              "decode speedup", "target (0.9 x params ratio)"]
    header += ["decode ms/token: linear layers + rest"] if anatomy else []
    header += ["KV bytes/token (config / DynamicCache)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in speed["rows"]:
        cells = [row["model"], f"{row['parameters']:,}"]
        for key in batches:
            cell = f"{row[f'{key}_tokens_per_s']:.0f}"
            cells.append(cell + (f" ({row[f'{key}_speedup']:.2f}x)" if f"{key}_speedup" in row else ""))
        cells += [f"{row['decode_tokens_per_s']:.1f}",
                  f"{row['decode_speedup']:.3f}x" if "decode_speedup" in row else "-",
                  f"{row['decode_target_speedup']:.3f}x" if "decode_target_speedup" in row else "-"]
        if anatomy:
            cells.append(f"{row['decode_ms_per_token']:.1f}: {row['linear_ms_per_token']:.1f} + "
                         f"{row['other_ms_per_token']:.1f}")
        cells.append(f"{row['kv_bytes_per_token_config']:,} / {row['kv_bytes_per_token_measured']:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _decode_anatomy(speed: dict) -> str:
    """Where a decode step's time goes, and why the speedup is what it is, from the measured rows."""
    dense = speed["rows"][0]
    if "linear_ms_per_token" not in dense:
        return ""
    share = dense["linear_ms_per_token"] / dense["decode_ms_per_token"]
    pruned = "; ".join(
        f"{row['model']}: linear layers {row['linear_speedup']:.2f}x faster (parameter ratio "
        f"{row['params_ratio']:.2f}), rest {row['other_ms_per_token']:.1f} ms, whole step {row['decode_speedup']:.2f}x"
        for row in speed["rows"][1:])
    return (f"Where a decode step's time goes: in the dense model the linear layers (LM head included, timed alone) "
            f"take {dense['linear_ms_per_token']:.1f} of {dense['decode_ms_per_token']:.1f} ms per token "
            f"({_pct(share)}); the rest, {dense['other_ms_per_token']:.1f} ms (the step minus the linear layers: norms, "
            f"rotary embeddings, cache updates, attention, `generate`'s loop), is per-operation cost that pruning "
            f"does not remove. {pruned}.")


def _speed_block(speed: dict) -> list[str]:
    """Protocol, table and decode anatomy of one speed results file."""
    protocol = speed["protocol"]
    return [
        f"{protocol['model']}; pruned models: {protocol['pruned_models']}. Prefill: {protocol['prefill']}. "
        f"Decode: {protocol['decode']}. {protocol['statistic'].capitalize()} ({protocol['rounds']} rounds). "
        f"{_provenance(speed)}",
        "",
        *_speed_table(speed),
        "",
        _decode_anatomy(speed),
        "",
    ]


def speed_section(speed, speed_large, quick: bool) -> str:
    lines = ["## Pruned-model speed", ""]
    lines += _speed_block(speed) if speed else [_missing("speed.py", quick)]
    lines += ["### A larger model: the memory benchmark's random-initialised Llama", ""]
    lines += _speed_block(speed_large) if speed_large else [_missing("speed.py --large", quick)]
    return "\n".join(lines)


def quality_section(quality, quick: bool, plot_name: str | None) -> str:
    lines = ["## Quality: perplexity against parameters removed", ""]
    if not quality:
        return "\n".join(lines + [_missing("quality.py", quick)])
    protocol = quality["protocol"]
    lines += [
        f"Protocol: {protocol['model']}; calibration {protocol['calibration']}; perplexity on the "
        f"{protocol['evaluation']}. {_provenance(quality)}",
        "",
    ]
    if quality.get("complete") is False:
        lines += ["**This run was interrupted: the table holds the rows it finished.**", ""]
    commits = sorted({row.get("commit") or "not recorded" for row in quality["rows"]})
    if "--resume" in quality.get("command", "") or len(commits) > 1:
        lines += [f"The table was assembled over successive runs of the same protocol (`--resume`); each row records "
                  f"the commit it was measured at ({', '.join(commits)}).", ""]
    lines += [
        "| variant | target | parameters | removed | perplexity | pruning time / dense forward | decomposition s | "
        + " | ".join(f"{name} / dense" for name in OUT_OF_DOMAIN_SOURCES) + " |",
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(OUT_OF_DOMAIN_SOURCES),
    ]
    dense = next(row for row in quality["rows"] if row["variant"] == "dense")
    lines.append(f"| dense | - | {dense['parameters']:,} | 0% | {dense['perplexity']:.2f} | - | - | "
                 f"{' | '.join(_out_of_domain_cells(dense, dense))} |")
    pruned = [row for row in quality["rows"] if row["variant"] != "dense"]
    order = {name: index for index, name in enumerate(VARIANT_ORDER)}
    pruned.sort(key=lambda row: (row["ratio"], order.get(row["variant"], len(order))))
    for row in pruned:
        decomposition = row.get("timings", {}).get("decomposition_s")
        lines.append(
            f"| {row['variant']} | {100 * row['ratio']:.0f}% | {row['parameters']:,} | "
            f"{100 * row['achieved_ratio']:.2f}% | {_format_perplexity(row['perplexity'])} | "
            f"{row['prune_over_dense_forward']:.2f}x | {'-' if decomposition is None else f'{decomposition:.1f}'} | "
            f"{' | '.join(_out_of_domain_cells(row, dense))} |"
        )
    measured = sorted({(row["variant"], row["ratio"]) for row in pruned})
    variants = sorted({variant for variant, _ in measured}, key=lambda name: order.get(name, len(order)))
    ratios = sorted({ratio for _, ratio in measured})
    absent = [f"{variant} at {100 * ratio:.0f}%" for variant in variants for ratio in ratios
              if (variant, ratio) not in measured]
    if absent:
        lines += ["", f"Not in this run: {', '.join(absent)}."]
    lines += ["", f"Out of domain ({quality['protocol'].get('out_of_domain') or 'the bundled out-of-domain texts'}): "
              "each pruned row's perplexity on that text as a ratio to the dense model's on the same tokens (the "
              "dense row gives its perplexity); \"not measured\" where the row predates these texts.",
              "", "Each row's time ratio divides its prune by a dense forward timed right before it, and its "
              "decomposition time is wall time: when other jobs share the machine, the load can change between "
              "the two measurements, so the cost section above (one prune between three dense forwards) is the "
              "reference figure for the pruning cost."]
    descriptions = quality.get("variants") or {}
    if descriptions:
        lines += ["", "Variants:"]
        lines += [f"- `{name}`: {descriptions[name]}" for name in variants if name in descriptions]
    lines += _ablation_lines(pruned)
    if plot_name:
        lines += ["", f"![Perplexity against parameters removed]({plot_name})"]
    lines += [
        "",
        "The paper's own code on this protocol (it expands GQA to MHA, so its nominal 20%/33% remove only "
        "11.9%/26.1% of the real parameters) reaches 55.6 with 118.5M parameters and 87.2 with 99.4M (figures "
        "given in the project's issue tracker, not re-measured here).",
        "",
    ]
    return "\n".join(lines)


def _ablation_lines(pruned: list[dict]) -> list[str]:
    """One sentence per ratio comparing Olica with its ablations at the same parameter count, from the rows."""
    by_key = {(row["variant"], row["ratio"]): row for row in pruned}
    lines = []
    for ratio in sorted({row["ratio"] for row in pruned}):
        olica = by_key.get(("olica", ratio))
        if olica is None:
            continue
        parts = []
        for name, label in (("olica_no_lc", "without linear calibration"),
                            ("olica_branch_only", "the paper's LC branch instead of the refit"),
                            ("olica_refit_and_branch", "refit and branch"), ("magnitude", "magnitude pruning")):
            other = by_key.get((name, ratio))
            if other is not None:
                verdict = "better" if olica["perplexity"] < other["perplexity"] else "not better"
                parts.append(f"{label} {_format_perplexity(other['perplexity'])} at {other['parameters']:,} "
                             f"({verdict})")
        if parts:
            lines.append(f"- {100 * ratio:.0f}%: Olica {_format_perplexity(olica['perplexity'])} at "
                         f"{olica['parameters']:,} parameters; " + "; ".join(parts) + ".")
    if lines:
        lines = ["", "Olica against its ablations at the same parameter count:", ""] + lines
    return lines


def _out_of_domain_cells(row: dict, dense: dict) -> list[str]:
    """One cell per out-of-domain text: the ratio to dense (the dense row: its perplexity), or "not measured"."""
    cells = []
    for name in OUT_OF_DOMAIN_SOURCES:
        value = row.get("out_of_domain_perplexity", {}).get(name)
        reference = dense.get("out_of_domain_perplexity", {}).get(name)
        if value is None or reference is None:
            cells.append("not measured")
        elif row is dense:
            cells.append(f"ppl {_format_perplexity(value)}")
        else:
            cells.append(f"{value / reference:.2f}x")
    return cells


def domains_section(domains, quick: bool, title: str = "Quality across domains", intro: str = "",
                    command: str = f"--variants olica --ratios 0.2 --results {DOMAINS_RESULTS}",
                    widths: bool = False) -> str:
    """The rows measured on every text (bench/quality.py --results quality_domains), each as a ratio to dense;
    with ``widths``, the pruned value head and FFN widths of each row too."""
    lines = [f"## {title}", ""] + ([intro, ""] if intro else [])
    if not domains:
        flag = " --quick" if quick else ""
        return "\n".join(lines + [f"Not measured yet: run `python bench/quality.py{flag} {command}`.\n"])
    protocol = domains["protocol"]
    lines += [
        f"Protocol: {protocol['model']}; calibration {protocol['calibration']}; in domain: the "
        f"{protocol['evaluation']}; out of domain: the {protocol.get('out_of_domain', 'not measured')}. "
        f"{_provenance(domains)}",
        "",
        "The calibration text is Austen, so Pride and Prejudice is in its domain; the legal and code texts are not. "
        "Each perplexity is a ratio to the dense model's on the same tokens (the dense row gives its perplexity).",
        "",
        "| variant | target | parameters | " + ("value head | FFN | " if widths else "") + "Pride and Prejudice | "
        + " | ".join(OUT_OF_DOMAIN_SOURCES) + " |",
        "| --- | --- | --- | --- |" + " --- |" * (len(OUT_OF_DOMAIN_SOURCES) + (2 if widths else 0)),
    ]
    dense = next(row for row in domains["rows"] if row["variant"] == "dense")
    lines.append(f"| dense | - | {dense['parameters']:,} | {'full | full | ' if widths else ''}"
                 f"ppl {_format_perplexity(dense['perplexity'])} | {' | '.join(_out_of_domain_cells(dense, dense))} |")
    for row in sorted((row for row in domains["rows"] if row is not dense), key=lambda row: row["ratio"]):
        lines.append(f"| {row['variant']} | {100 * row['ratio']:.0f}% | {row['parameters']:,} | "
                     f"{_width_cells(row) if widths else ''}{row['perplexity'] / dense['perplexity']:.2f}x | "
                     f"{' | '.join(_out_of_domain_cells(row, dense))} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {description}" + _generation_note(domains["rows"], name)
              for name, description in domains.get("variants", {}).items()]
    return "\n".join(lines + [""])


def _width_cells(row: dict) -> str:
    """The value head and FFN width cells of a row (bench/quality.py records them as ``widths``)."""
    measured = row.get("widths") or {}
    return " | ".join(str(measured.get(key, "not recorded")) for key in ("value_head_dim", "intermediate_size")) + " | "


def _generation_note(rows: list[dict], name: str) -> str:
    """The seconds a variant spent sampling its self-generated calibration sequences, apart from pruning."""
    seconds = [row["generation_s"] for row in rows if row["variant"] == name and row.get("generation_s")]
    if not seconds:
        return "."
    return (f" (generating its sequences took {min(seconds):.0f} to {max(seconds):.0f} s, not counted in the "
            "pruning time).")


def screening_section(screen, quick: bool) -> str:
    """The screened calibration and refit variants (bench/calibration_screen.py): cheaper protocol, every variant."""
    lines = ["## Calibration variants screened (issue 15)", ""]
    if quick:
        return ""
    if not screen:
        return "\n".join(lines + ["Not measured yet: run `python bench/calibration_screen.py`.\n"])
    protocol = screen["protocol"]
    lines += [
        f"A cheaper protocol than the tables above, to choose what gets their full run: SmolLM2-135M-Instruct, "
        f"20% or 33% of the parameters really removed; calibration {protocol['calibration']}; "
        f"perplexity on the first {protocol['eval_tokens']:,} tokens of each text (windows of 128), "
        f"{protocol['threads']} thread. Each cell is a ratio to the dense model on the same tokens. Nothing was tuned "
        f"to the legal or code text. The seconds are wall times on a machine shared with other work: they compare "
        f"poorly from row to row. Every row runs with the defaults of the day the screen began (the paper's Q/K and "
        f"V/O weighting, no trajectory, one FFN width for the variants measured before the adaptive allocation); "
        f"the 33% rows were measured later than the 20% ones, so compare rows within one ratio. {_provenance(screen)}",
        "",
        "| variant | target | sequences | recipe overrides | Pride and Prejudice | licenses | python-stdlib | "
        "prune (s) | generation (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = next(row for row in screen["rows"] if row["variant"] == "dense")["perplexity"]
    lines.append("| dense | - | - | - | " + " | ".join(f"ppl {_format_perplexity(v)}" for v in dense.values())
                 + " | - | - |")
    pruned = [row for row in screen["rows"] if row["variant"] != "dense"]
    for row in sorted(pruned, key=lambda row: row["ratio"]):
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "-"
        cells = " | ".join(f"{row['perplexity'][name] / value:.2f}x" for name, value in dense.items())
        lines.append(f"| {row['variant']} | {100 * row['ratio']:.0f}% | {row['num_sequences']} | {overrides} | "
                     f"{cells} | {row['prune_s']:.0f} | {row['generation_s']:.0f} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {variant['description']}." for name, variant in screen["variants"].items()]
    # The script keeps the rows it finds, so the table may come from several runs: each row names its own.
    lines += _measured_by(screen["rows"], "each run keeps the rows already there; a variant a command names but the "
                          "table lacks was not measured: that run was stopped first")
    return "\n".join(lines + [""])


def _measured_by(rows: list[dict], note: str) -> list[str]:
    """The commands that measured a screen's rows, in order (a screen keeps the rows of earlier runs)."""
    commands = list(dict.fromkeys(row["command"] for row in rows if row.get("command")))
    if not commands:
        return []
    return ["", f"Measured by (in order; {note}):", "", *[f"- `{command}`" for command in commands]]


def allocation_screen_section(screen, quick: bool) -> str:
    """The allocation and selection variants of bench/allocation_screen.py, at 20% and 33%."""
    lines = ["## Allocation and selection variants screened (issue 15)", ""]
    if quick:
        return ""
    if not screen:
        return "\n".join(lines + ["Not measured yet: run `python bench/allocation_screen.py`.\n"])
    protocol = screen["protocol"]
    lines += [
        "Variants of what is cut where, at the same target. The first rows keep the same number of FFN neurons in "
        "all (the parameter count of `uniform`) and differ only in how the layers share them: each layer's neuron "
        "scores come from one dense pass, and the variants differ in how scores of different layers are made "
        "comparable before the highest are kept. The `reconstruction` and `shrunk_moments` rows change which "
        "neurons a layer keeps at the shipped widths; the `qk`, `whole_values` rows move parameters between the "
        "attention and the FFN (the FFN width is solved for the same total, within half a point); the "
        "`trajectory`, `dense_stream` rows change where the refits aim (the dense model's own hidden states, "
        "`trajectory_weight`); `plus_generated_64_refit_on_data` adds 64 sequences the model writes to the 128 "
        "windows, for what is cut only (what `self_calibration=\"auto\"` does with data of one's own); the "
        "`shared_qk` rows share the Q/K ranks between layers at the same totals (bench/attention_allocation.py); the "
        "`covariance` rows factor Q/K under the attention input's full second-moment matrix, shrunk toward its "
        "diagonal by the named share (bench/whitened_qk.py; `covariance_setting` is the library's "
        "`qk_covariance_shrinkage=0.5`); the `score_weighted_qk` rows weigh each Q/K output channel by what its "
        "error does to the attention scores (bench/score_weighted_qk.py); the `whitened_values` rows reduce V/O "
        "under the second moments of `o_proj`'s input (the library's `value_decomposition=\"whitened\"`). Every row "
        "before `covariance_setting` ran with the diagonal weighting (`qk_covariance_shrinkage=1`), the default when "
        "the screen began, and every row before `whitened_values` with the paper's fast OND for V/O. Protocol: "
        f"SmolLM2-135M-Instruct; calibration {protocol['calibration']}; perplexity on the first "
        f"{protocol['eval_tokens']:,} tokens of each text (windows of 128), as a ratio to dense on the same tokens. "
        f"{_provenance(screen)}",
        "",
        "| variant | target | parameters | FFN widths (min / max) | Pride and Prejudice | licenses | python-stdlib |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = next(row for row in screen["rows"] if row["variant"] == "dense")["perplexity"]
    lines.append("| dense | - | - | 1536 | " + " | ".join(f"ppl {_format_perplexity(v)}" for v in dense.values()) + " |")
    for row in sorted((row for row in screen["rows"] if row["variant"] != "dense"), key=lambda row: row["ratio"]):
        cells = " | ".join(f"{row['perplexity'][name] / value:.3f}x" for name, value in dense.items())
        lines.append(f"| {row['variant']} | {100 * row['ratio']:.0f}% | {row['parameters']:,} | "
                     f"{min(row['widths'])} / {max(row['widths'])} | {cells} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {description}." for name, description in screen["variants"].items()]
    lines += _measured_by(screen["rows"], "each run keeps the rows already there")
    lines += ["", "Per-layer FFN widths (layer 0 first):", ""]
    lines += [f"- `{row['variant']}` {100 * row['ratio']:.0f}%: {', '.join(map(str, row['widths']))}"
              for row in screen["rows"] if row["variant"] not in ("dense", "uniform")]
    return "\n".join(lines + [""])


def _format_perplexity(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def _plan_lines(gpu) -> list[str]:
    """The memory plan's per-phase accelerator bytes (``bench/gpu.py`` computes them from the configs), next to the
    per-phase peaks measured on a GPU where there are any."""
    plans = gpu.get("plans", [])
    if not plans:
        return []
    measured = {run["offload_activations"]: run.get("phase_peak_gpu_bytes", {})
                for run in gpu.get("llama3_8b_streaming", [])}
    phases = list(plans[0]["phases"])
    header = []
    for plan in plans:
        size = plan["name"]
        where = "CPU" if plan["offload_activations"] else "GPU"
        header.append(f"plan {size}, activations on {where}")
        if size == "8B":
            header.append(f"measured {size}, activations on {where}")
    lines = ["Memory plan (`optimum-cli olica prune MODEL OUT --dry-run --streaming --num-samples 256 --sequence-length "
             "128 --device cuda`, from the config alone), accelerator bytes per phase for one layer, and the peak "
             "`torch.cuda.max_memory_allocated` measured in each phase (\"not measured\" without a GPU run):", "",
             "| phase | " + " | ".join(header) + " |", "| --- |" + " --- |" * len(header)]
    for phase in phases:
        cells = []
        for plan in plans:
            cells.append(_gb(plan["phases"][phase]["device_bytes"]))
            if plan["name"] == "8B":
                value = measured.get(plan["offload_activations"], {}).get(phase)
                cells.append(_gb(value) if value is not None else "not measured")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return lines + [""]


def _decode_lines(decode) -> list[str]:
    rows = decode["ms_per_step"]
    contexts = list(rows["dense"])
    lines = [f"Decode, batch 1, {decode['steps']} greedy steps after a prefill ({decode['attention']}; pruned value "
             f"heads {decode['pruned_value_head_dims']} wide, key heads {decode['head_dim']}): ms per step", "",
             "| model | " + " | ".join(f"{c} tokens of context" for c in contexts) + " |",
             "| --- |" + " --- |" * len(contexts)]
    for variant, label in (("dense", "dense"), ("pruned_padded", "pruned, value heads padded (as shipped)"),
                           ("pruned_unpadded", "pruned, value heads unpadded")):
        lines.append(f"| {label} | " + " | ".join(f"{rows[variant][c]:.2f}" for c in contexts) + " |")
    return lines + [""]


def gpu_section(gpu, quick: bool) -> str:
    lines = ["## GPU", ""]
    if not gpu:
        return "\n".join(lines + [_missing("gpu.py", quick)])
    lines += [f"Protocol: {gpu['protocol']['model']}, calibration {gpu['protocol']['calibration']}; the checkpoint's "
              "files are dropped from the page cache first, so the wall time includes reading the weights from disk. "
              f"{_provenance(gpu)}", ""]
    lines += _plan_lines(gpu)
    if not gpu.get("gpu_run"):
        lines += [f"**The GPU benchmark was not run ({gpu['reason']}).** Not measured: "
                  + "; ".join(gpu.get("not_measured", ["the GPU wall time, peak GPU memory and CPU/GPU perplexity"]))
                  + ". Run `PYTHONPATH=. python bench/gpu.py --no-report` on a machine with an NVIDIA GPU."]
        rehearsal = gpu.get("cpu_rehearsal")
        if rehearsal:
            lines += ["", f"What did run: {rehearsal['note']} ({rehearsal['model']}, {rehearsal['calibration']}, "
                      f"streaming): pruned to {_pct(rehearsal['achieved_ratio'])} in {rehearsal['wall_s']:.1f} s."]
        return "\n".join(lines + [""])
    lines += ["| activations between layers | wall time | target | peak GPU memory | target | achieved ratio |",
              "| --- | --- | --- | --- | --- | --- |"]
    targets = gpu["targets"]
    for run in gpu.get("llama3_8b_streaming", gpu.get("llama2_7b_streaming", [])):
        lines.append(f"| {'CPU (offload_activations)' if run['offload_activations'] else 'GPU'} | "
                     f"{run['wall_s']:.1f} s | < {targets['wall_s']:.0f} s | {_gb(run['peak_gpu_bytes'])} | "
                     f"< {_gb(targets['peak_gpu_bytes'])} | {_pct(run['achieved_ratio'])} |")
    if gpu.get("decode"):
        lines += [""] + _decode_lines(gpu["decode"])
    if gpu.get("skipped"):
        lines += ["", "Skipped in this run: " + "; ".join(gpu["skipped"]) + "."]
    comparison = gpu.get("smollm2_cpu_vs_gpu")
    if comparison and not comparison.get("measured", True):
        lines += ["", f"SmolLM2 CPU vs GPU: not measured ({comparison['reason']})."]
    elif comparison:
        lines += ["", f"SmolLM2-135M at 20% ({comparison['calibration']}; {comparison['evaluation']}): perplexity "
                  f"{comparison['pruned_on_cpu']['perplexity']:.3f} pruned on the CPU, "
                  f"{comparison['pruned_on_gpu']['perplexity']:.3f} pruned on the GPU: a gap of "
                  f"{_pct(comparison['relative_gap'])} (target < {_pct(comparison['target_relative_gap'])})."]
    return "\n".join(lines + [""])


def _screening_verdicts(screen) -> str:
    """One sentence per screened variant against the benchmark calibration at the same ratio."""
    verdicts = []
    ratios = sorted({row["ratio"] for row in screen["rows"] if "ratio" in row})
    for ratio in ratios:
        rows = {row["variant"]: row["perplexity"] for row in screen["rows"] if row.get("ratio") == ratio}
        reference = rows.get("austen")
        if reference is None:
            continue
        for name, values in rows.items():
            if name == "austen":
                continue
            better = [text for text in values if values[text] < reference[text]]
            worse = [text for text in values if values[text] >= reference[text]]
            verdicts.append(f"`{name}` at {100 * ratio:.0f}% "
                            + (f"better on {', '.join(better)}" if better else "better nowhere")
                            + (f", not better on {', '.join(worse)}" if worse else ""))
    if not verdicts:
        return ""
    return ("Screened against the benchmark calibration (bench/calibration_screen.py, same tokens, same ratio): "
            + "; ".join(verdicts) + ".")


def closing_note(cost, memory, speed, speed_large, quality, gpu, domains=None, screen=None) -> str:
    """Quote the headline figures and name the largest remaining cost, from the data."""
    lines = ["## Closing note", ""]
    quoted = []
    if cost:
        quoted.append(f"pruning SmolLM2 by 20% costs {cost['prune_over_dense_forward']:.2f} dense forwards over the "
                      f"calibration set (target 2.5)")
    if memory:
        for run in memory["runs"]:
            if run["mode"] == "streaming":
                quoted.append(f"streaming peaks at {run['peak_over_checkpoint']:.3f} of the checkpoint's size "
                              f"(target 0.35)")
            else:
                quoted.append(f"the fully-loaded mode at {run['peak_over_checkpoint']:.3f}")
    if speed:
        for row in speed["rows"][1:]:
            quoted.append(f"{row['model']} decodes {row['decode_speedup']:.2f}x faster than dense (target "
                          f"{row['decode_target_speedup']:.2f}x) and prefills {row['prefill_b8_speedup']:.2f}x at "
                          f"batch 8, with {_pct(row['kv_fraction_of_dense'])} of the dense KV cache")
    if speed_large:
        for row in speed_large["rows"][1:]:
            quoted.append(f"at {_model_size(speed_large)} parameters {row['model']} decodes "
                          f"{row['decode_speedup']:.2f}x faster than dense (target {row['decode_target_speedup']:.2f}x)")
    if quality:
        dense = next(row for row in quality["rows"] if row["variant"] == "dense")
        for row in quality["rows"]:
            if row["variant"] == "olica":
                quoted.append(f"Olica at {100 * row['ratio']:.0f}% keeps perplexity at {row['perplexity']:.2f} "
                              f"(dense {dense['perplexity']:.2f})")
    if domains:
        dense = next(row for row in domains["rows"] if row["variant"] == "dense")
        for row in domains["rows"]:
            if row is not dense:
                quoted.append(f"{row['variant']} at {100 * row['ratio']:.0f}% is at "
                              f"{row['perplexity'] / dense['perplexity']:.2f}x dense perplexity in domain and "
                              f"{' / '.join(_out_of_domain_cells(row, dense))} on "
                              f"{' / '.join(OUT_OF_DOMAIN_SOURCES)}")
    if gpu is None or not gpu.get("gpu_run"):
        quoted.append("the GPU targets are not measured yet")
    if quoted:
        lines.append("Measured: " + "; ".join(quoted) + ".")
    if screen and _screening_verdicts(screen):
        lines += ["", _screening_verdicts(screen)]
    if cost:
        shares = {phase: share for phase, share in cost["phase_shares"].items()}
        largest = max(shares, key=shares.get)
        second = sorted(shares, key=shares.get, reverse=True)[1]
        lines += ["", f"The largest remaining cost is the **{largest}** phase, {_pct(shares[largest])} of the pruning "
                  f"time ({shares[largest] * cost['prune_over_dense_forward']:.2f} dense forwards), then {second} "
                  f"({_pct(shares[second])}). The pipeline runs every layer at least twice (a statistics pass on the "
                  "dense layer, a propagation pass on the pruned one), so about 2x is its floor unless passes are "
                  "fused; everything above that is decomposition and refit work."]
    return "\n".join(lines + [""])


# ---- the plot ---------------------------------------------------------------------------------------------------


def plot_quality(quality, path: Path) -> bool:
    """Perplexity (log scale) against the fraction of parameters removed, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", flush=True)
        return False
    dense = next(row for row in quality["rows"] if row["variant"] == "dense")
    by_variant: dict[str, list[tuple[float, float]]] = {}
    for row in quality["rows"]:
        if row["variant"] != "dense" and math.isfinite(row["perplexity"]):
            by_variant.setdefault(row["variant"], []).append((100 * row["achieved_ratio"], row["perplexity"]))
    order = {name: index for index, name in enumerate(VARIANT_ORDER)}
    names = sorted(by_variant, key=lambda name: order.get(name, len(order)))
    colours = {name: f"C{index}" for index, name in enumerate(VARIANT_ORDER)}
    # Left: every variant on a log scale (the magnitude baseline sits orders of magnitude above); right: the
    # Olica variants alone on a linear scale, where their differences are visible.
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for axis, shown, log in ((axes[0], names, True), (axes[1], [n for n in names if n.startswith("olica")], False)):
        for variant in shown:
            points = [(0.0, dense["perplexity"])] + sorted(by_variant[variant])
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=variant,
                      color=colours.get(variant))
        axis.axhline(dense["perplexity"], color="gray", linestyle="--", label=f"dense ({dense['perplexity']:.1f})")
        if log:
            axis.set_yscale("log")
        axis.set_xlim(left=-1)
        axis.set_xlabel("parameters removed (%)")
        axis.set_ylabel("perplexity" + (" (log scale)" if log else ""))
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_title("all variants")
    axes[1].set_title("Olica variants")
    figure.suptitle("SmolLM2-135M: perplexity on Pride and Prejudice against parameters removed")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: regenerating the same data gives the same file.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="render the *_quick.json results, away from docs/")
    args = parser.parse_args(argv)
    quick = args.quick
    cost, memory, speed, speed_large, quality, gpu, domains = (
        _load(name, quick) for name in ("cost", "memory", "speed", "speed_large", "quality", "gpu", DOMAINS_RESULTS))
    doc, plot = (QUICK_DOC, QUICK_PLOT) if quick else (DOC, PLOT)
    plot_name = None
    if quality and plot_quality(quality, plot):
        plot_name = plot.name if quick else f"img/{plot.name}"
    # The headline across domains is the current default's: the allocation run where there is one.
    allocation = None if quick else _load(ALLOCATION_RESULTS, False)
    trajectory = None if quick else _load(TRAJECTORY_RESULTS, False)
    covariance = None if quick else _load(COVARIANCE_RESULTS, False)
    attention = None if quick else _load(ATTENTION_RESULTS, False)
    headline = attention or covariance or allocation or domains
    summary = summary_rows(cost, memory, speed, speed_large, quality, gpu, headline)
    screen = None if quick else _load(SCREEN_RESULTS, False)
    lines = [
        "# Benchmarks" + (" (quick smoke run: small settings, not the reference figures)" if quick else ""),
        "",
        "<!-- generated by bench/report.py from bench/results/*.json; do not edit by hand -->",
        "Generated by `bench/report.py` from the JSON files under `bench/results/` (`make bench` runs every "
        "benchmark and rewrites this page; `make bench-quick` is a smoke run that writes "
        "`bench/results/*_quick.json` and `bench/results/benchmarks_quick.md` instead). Every ratio divides two "
        "measurements taken in the same run; each section names its machine, versions, command and date.",
        "",
        "## Summary",
        "",
        "| figure | target | measured | measured / target | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {' | '.join(row)} |" for row in summary]
    lines += ["", cost_section(cost, quick), memory_section(memory, quick), speed_section(speed, speed_large, quick),
              quality_section(quality, quick, plot_name),
              domains_section(domains, quick, intro=(
                  "Measured with one FFN width in every layer, the default before the adaptive allocation: `olica` "
                  "here is `olica_uniform` in [Sharing the FFN between layers](#sharing-the-ffn-between-layers-"
                  "adaptive-against-uniform-issue-15).") if allocation else ""),
              domains_section(
                  _load(DEPLOYMENT_RESULTS, False) if not quick else None, quick, "The stock recipe beside Olica",
                  "The stock recipe (`architecture=\"stock\"`) prunes only FFN neurons, one width in every layer, so "
                  "the checkpoint is the base family itself and serving engines load it at its pruned size; Olica's "
                  "own checkpoint is smaller than its stock export (see [Deployment](deployment.md)). Same protocol "
                  "as the table above; measured before the adaptive allocation, so `olica` has one FFN width here.",
                  f"--variants olica,olica_stock --ratios 0.2,0.33 --results {DEPLOYMENT_RESULTS}"),
              domains_section(
                  _load(MULTIPLES_RESULTS, False) if not quick else None, quick, "Widths in multiples of 8, 32, 64",
                  "`dimension_multiple` rounds the Q/K ranks, the value head widths (or keeps whole heads) and the FFN "
                  "width; the FFN is solved after the attention, so every row removes its target within half a "
                  "point (where no multiple of the FFN width does, the FFN keeps its exact width). `olica` is the "
                  "default (multiples of 8); 32 and 64 give the blocks of group-wise quantized formats (see "
                  "[Deployment](deployment.md#quantization-after-pruning)). Same protocol as the table above; "
                  "SmolLM2's `head_dim` is 64, its FFN 1,536 wide. Measured before the adaptive allocation: every "
                  "row has one FFN width.",
                  "--variants olica,olica_multiple_1,olica_multiple_32,olica_multiple_64 --ratios 0.2,0.33 "
                  f"--results {MULTIPLES_RESULTS}", widths=True),
              domains_section(
                  allocation, quick,
                  "Sharing the FFN between layers: adaptive against uniform (issue 15)",
                  "`layer_allocation=\"adaptive\"` (the default since this measurement) gives each layer the FFN "
                  "width its neuron scores earn on the dense model; `olica_uniform` gives every layer the same "
                  "width, as every table above measured before it did (their `olica` is this table's "
                  "`olica_uniform`). Same parameter count, same protocol as the table above; the next section "
                  "compares ways of making scores of different layers comparable. `olica_self_calibrated` is the "
                  "calibration the default (`self_calibration=\"auto\"`) draws without data of one's own: the "
                  "bundled text alternating with the model's own text. The benchmark's `olica` rows pass the "
                  "benchmark windows as data of their own, so the protocol keeps its fixed Austen calibration.",
                  f"--variants olica,olica_uniform --ratios 0.2,0.33 --results {ALLOCATION_RESULTS}"),
              domains_section(
                  None if quick else _load(OWN_DATA_RESULTS, False), quick,
                  "Your data and the model's own text (issue 15)",
                  "What the default (`self_calibration=\"auto\"`) does with data of one's own: all of its windows "
                  "(here the benchmark's 128 Austen windows) and half as many sequences the model writes itself, "
                  "interleaved, the refits fitted on the data alone (`refit_on=\"data\"`), so the model's text only "
                  "informs what is cut. Same protocol as the tables above; the data-only rows (`olica`) are those of "
                  "[Sharing the FFN between layers](#sharing-the-ffn-between-layers-adaptive-against-uniform-issue-15): "
                  "1.23x / 1.94x / 3.21x at 20% and 1.60x / 3.87x / 16.22x at 33%. The benchmark's `olica` rows keep "
                  "the fixed Austen calibration, so figures stay comparable across the page. Half as many tokens "
                  "again: the pruning time grows by half, and the generation is reported apart (its ratio to a "
                  "dense forward over its own 192 sequences stays about 2x). The first run shared the machine with "
                  "the test suite and was stopped after its 20% row, whose time ratio is that contention; the 33% "
                  "row comes from the `--resume` run named above.",
                  f"--variants olica_plus_self_generated --ratios 0.2,0.33 --results {OWN_DATA_RESULTS}"),
              domains_section(
                  trajectory, quick,
                  "Refits aimed at the dense model's own hidden states (issue 15)",
                  "By default each layer's `o_proj`/`down_proj` refit aims at what the dense layer computes on the "
                  "pruned model's inputs, so it repairs that layer's own error only. With `trajectory_weight=0.5` the "
                  "targets lie halfway between that and the dense model's own residual stream at the same depth, "
                  "which the pipeline then carries beside the pruned one: each refit also takes back part of the "
                  "error the layers before it let through. Same protocol and parameter counts as the table above; "
                  "its `olica` and `olica_self_calibrated` rows are copied here (`trajectory_weight=0`). The "
                  "`*_trajectory` rows were measured at commit bfb7670, where 0.5 was briefly the default, as "
                  "`olica` and `olica_self_calibrated` (each row records its former name); they are what "
                  "`--variants olica_trajectory,olica_self_calibrated_trajectory` runs now. Better in domain at both "
                  "ratios and on every text at 20% with the benchmark's own data; worse on Python at 33% (22.9x "
                  "against 16.2x) and out of domain with the self-generated mix, so not the default. Its cost is one "
                  "more dense pass per layer: 3.36x a dense forward over the calibration set against 2.25x "
                  "(`python bench/cost.py` at bfb7670). The screened weights 0, 0.5 and 1 are in the next section "
                  "(`trajectory*`).",
                  "--variants olica_trajectory,olica_self_calibrated_trajectory --ratios 0.2,0.33 "
                  f"--results {TRAJECTORY_RESULTS}"),
              domains_section(
                  covariance, quick,
                  "Q/K factored under the input's correlations (issue 15)",
                  "`qk_covariance_shrinkage=0.5` (the default since this measurement) factors `q_proj` and `k_proj` "
                  "to the best low rank under the attention input's second-moment matrix shrunk halfway toward its "
                  "diagonal, where the paper weighs each input channel alone (`qk_covariance_shrinkage=1`; see "
                  "[Method](method.md)). Same protocol and parameter counts as the tables above, whose `olica` rows "
                  "were all measured with the diagonal weighting (`--variants olica_diagonal_qk` runs them now): "
                  "data alone 1.23x / 1.94x / 3.21x at 20% and 1.60x / 3.87x / 16.22x at 33% "
                  "([Sharing the FFN between layers](#sharing-the-ffn-between-layers-adaptive-against-uniform-issue-15)"
                  "), the default with data of one's own (`olica_plus_self_generated`) 1.24x / 1.86x / 2.76x and "
                  "1.60x / 3.54x / 7.31x ([Your data and the model's own text](#your-data-and-the-models-own-text-"
                  "issue-15)), the default with the bundled text (`olica_self_calibrated`) 1.34x / 1.79x / 2.21x and "
                  "1.84x / 2.96x / 4.59x. Better in domain and on the legal text for every calibration at both "
                  "ratios; on Python from 3% worse to 4% better. The screened shrinkages 0, 0.25, 0.5, 0.75 are in "
                  "the next section (`covariance_qk*`); `covariance_setting` there is this setting through the "
                  "library, with the same figures as the screen's own implementation. `olica_trajectory` adds "
                  "`trajectory_weight=0.5` to this factoring: better than `olica` on all three texts at both "
                  "ratios here (with the diagonal weighting it lost on Python at 33%); with the bundled mix "
                  "(`olica_self_calibrated_trajectory`, 20%) it still loses out of domain (1.77x / 2.34x against "
                  "1.69x / 2.20x), so it stays a setting for domain models. Its pruning times at 20% and 33% on "
                  "the Austen windows ran beside the test suite; the mixed row's ran alone.",
                  "--variants olica,olica_plus_self_generated,olica_self_calibrated,olica_trajectory --ratios 0.2,0.33 "
                  "(then --variants olica_self_calibrated_trajectory --ratios 0.2 --resume) "
                  f"--results {COVARIANCE_RESULTS}"),
              domains_section(
                  attention, quick,
                  "V/O and Q/K fitted to what the attention reads (issue 15)",
                  "Two changes to the attention's cuts, the defaults since this measurement (see "
                  "[Method](method.md)): `value_decomposition=\"whitened\"` keeps, in each KV group, the value "
                  "directions that carry the most of `o_proj`'s output under the second moments of `o_proj`'s input "
                  "(the values once the attention has mixed them), where the paper's fast OND rotates by the output "
                  "weights alone and drops channels by score; `qk_score_weighting=0.25` weighs each Q/K output's "
                  "low-rank error by what it does to the attention scores (the other side's energy in its rotary "
                  "pair), a quarter of the way from weighing every output alike. Same protocol and parameter counts "
                  "as the tables above; the rows before these changes are those of [Q/K factored under the input's "
                  "correlations](#qk-factored-under-the-inputs-correlations-issue-15). The screened settings are in "
                  "the next section (`whitened_values*`, `score_weighted*`). The `*_trajectory` rows add "
                  "`trajectory_weight=0.5` to these defaults: an option for domain models, not the default, since it "
                  "costs one more dense pass per layer and loses out of domain with the self-generated mix.",
                  "--variants olica,olica_plus_self_generated,olica_self_calibrated --ratios 0.2,0.33 "
                  "(then --variants olica_trajectory --resume, and --variants olica_self_calibrated_trajectory "
                  f"--ratios 0.2 --resume) --results {ATTENTION_RESULTS}"),
              allocation_screen_section(None if quick else _load(ALLOCATION_SCREEN_RESULTS, False), quick),
              screening_section(screen, quick), gpu_section(gpu, quick),
              closing_note(cost, memory, speed, speed_large, quality, gpu, headline, screen)]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}", flush=True)
    return doc


if __name__ == "__main__":
    main()
