"""Screening of calibration-data and refit-damping variants on three domains (issue 15, part 2).

A cheaper protocol than bench/quality.py, to pick the one or two variants worth its full run: the same model and the
same benchmark calibration (128 windows of 128 tokens of the bundled Austen text, seed 0), 20% (``--ratio``, or 33%)
of the parameters really removed, but perplexity on only the first 8,192 tokens of each text (Pride and Prejudice in domain; licenses
and python-stdlib out of domain, evaluation only), windows of 128, and one thread (the machine is shared).
Self-generated calibration (`optimum_olica.self_calibration`) is sampled once per (count, temperature) with seed 0 and
its generation time is recorded apart from the pruning time.

Every variant and ratio is one row of bench/results/calibration_screen.json, written as soon as it is measured, with
the command that measured it; a run keeps the rows already there (same protocol) and measures only the missing ones.

    python bench/calibration_screen.py --variants austen,self_generated,mixed_interleaved
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    chosen_variants,
    command_line,
    dense_forward_seconds,
    git_commit,
    results_path,
    write_results,
)

from optimum_olica.configuration import OlicaConfig  # noqa: E402
from optimum_olica.data import get_calibration_dataset, tokenize_for_perplexity  # noqa: E402
from optimum_olica.default_model import default_model_path  # noqa: E402
from optimum_olica.evaluation import OUT_OF_DOMAIN_SOURCES, held_out_text, perplexity  # noqa: E402
from optimum_olica.pruner import prune_model  # noqa: E402
from optimum_olica.self_calibration import generate_calibration_ids, mix_calibration_ids  # noqa: E402

EVAL_TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"
RESULTS = "calibration_screen"

# name -> (calibration recipe, arrangement, OlicaConfig overrides, description). A recipe lists its parts in order:
# ("austen", n) = the first n benchmark windows; ("generated", n, temperature) = n self-generated sequences.
# "interleave" alternates the two parts sequence by sequence (the refit's folds are then one source each);
# "concatenate" puts them one after the other (each batch of 32 is one source; the folds mix both).
VARIANTS = {
    "austen": ((("austen", 128),), "concatenate", {}, "the benchmark calibration (Olica as shipped)"),
    "self_generated": ((("generated", 128, 1.0),), "concatenate", {},
                       "128 sequences sampled from the model itself (temperature 1, from BOS), no data"),
    "mixed_interleaved": ((("austen", 64), ("generated", 64, 1.0)), "interleave", {},
                          ("64 Austen windows + 64 self-generated, alternating: the refit's cross-validation fits "
                           "on one source and validates on the other (same token budget)")),
    "mixed_concatenated": ((("austen", 64), ("generated", 64, 1.0)), "concatenate", {},
                           "the same 64 + 64, one after the other: each fold mixes both sources (same token budget)"),
    "mixed_interleaved_256": ((("austen", 128), ("generated", 128, 1.0)), "interleave", {},
                              "all 128 Austen windows + 128 self-generated, alternating (twice the tokens)"),
    "damping_1": ((("austen", 128),), "concatenate", {"refit_damping": 1.0},
                  ("Austen calibration, refit damping fixed at 1 (a stronger pull towards the pruned weights than "
                   "the cross-validated choice)")),
    "damping_10": ((("austen", 128),), "concatenate", {"refit_damping": 10.0},
                   "Austen calibration, refit damping fixed at 10"),
    "no_refit": ((("austen", 128),), "concatenate", {"refit_damping": None},
                 "Austen calibration, no refit (the paper's method without its branch)"),
    "self_generated_t07": ((("generated", 128, 0.7),), "concatenate", {},
                           "128 self-generated sequences at temperature 0.7"),
    "mixed_refit_on_data_setting": ((("austen", 64), ("generated", 64, 1.0)), "interleave",
                                    {"refit_on": "data", "self_calibration": 0.5},
                                    "mixed_refit_on_data through the recipe setting refit_on='data' (the library's "
                                    "own masks instead of this script's patch: the same figures expected)"),
    "mixed_refit_on_data": ((("austen", 64), ("generated", 64, 1.0)), "interleave_refit_on_data", {},
                            ("the mixed_interleaved calibration, but the o_proj/down_proj refits fitted (and "
                             "cross-validated) on the 64 Austen windows alone: the statistics that choose what is cut "
                             "see both sources, the least-squares fits only the data")),
}


# The variants first measured before layer_allocation existed (one FFN width in every layer): they keep it, so a row at
# another ratio measures the same variant.
_ONE_FFN_WIDTH = ("austen", "self_generated", "mixed_interleaved", "mixed_concatenated", "mixed_interleaved_256",
                  "damping_1", "damping_10", "no_refit", "self_generated_t07")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="austen,self_generated,mixed_interleaved",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored on each of the three texts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = chosen_variants(parser, args.variants, VARIANTS)

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    evaluation = screening_texts(tokenizer, args.eval_tokens)
    austen = get_calibration_dataset(tokenizer, "austen", 128, 128, seed=0)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    protocol = {"eval_tokens": args.eval_tokens, "calibration": "benchmark Austen 128 x 128, "
                "seed 0; self-generated: seed 0, from BOS", "threads": args.threads}
    rows = _previous_rows(protocol)
    generated_cache: dict[tuple[int, float], tuple[torch.Tensor, float]] = {}
    if not any(row["variant"] == "dense" for row in rows):
        dense = load()
        rows.insert(0, {"variant": "dense", "perplexity": perplexities(dense, evaluation), "commit": git_commit()})
    for name in variants:
        if any(row["variant"] == name and row.get("ratio") == args.ratio for row in rows):
            print(f"{name} @ {args.ratio}: kept from the previous run", flush=True)
            continue
        recipe, arrangement, overrides, _ = VARIANTS[name]
        model = load()
        calibration, generation_s = _calibration(recipe, arrangement, model, tokenizer, austen, generated_cache)
        # The defaults of the day the screen began unless the variant says otherwise: its rows ran so.
        pinned = {"trajectory_weight": 0.0, "qk_covariance_shrinkage": 1.0, "value_decomposition": "fast",
                  "qk_score_weighting": 0.0, "layer_allocation": "uniform" if name in _ONE_FFN_WIDTH else "adaptive"}
        config = OlicaConfig(ratio=args.ratio, num_samples=calibration.shape[0], sequence_length=128,
                             **{**pinned, **overrides})
        forward_s = dense_forward_seconds(model, calibration, 32)
        started = time.perf_counter()
        with _refit_on_data_only() if arrangement == "interleave_refit_on_data" else contextlib.nullcontext():
            result = prune_model(model, config, calibration, progress=False)
        prune_s = time.perf_counter() - started
        row = {"variant": name, "ratio": args.ratio, "num_sequences": calibration.shape[0], "overrides": overrides,
               "parameters": result.model.num_parameters(), "perplexity": perplexities(result.model, evaluation),
               "prune_s": prune_s, "dense_forward_s": forward_s, "generation_s": generation_s,
               "refit_dampings": _dampings(result.report), "commit": git_commit(),
               "command": command_line("calibration_screen.py", argv)}
        rows.append(row)
        _save(protocol, rows, argv)
        dense_row = rows[0]["perplexity"]
        print(f"{name} @ {args.ratio}: " + ", ".join(f"{k} {v:.2f} ({v / dense_row[k]:.2f}x)" for k, v in row["perplexity"].items())
              + f"; prune {prune_s:.0f} s, generation {generation_s:.0f} s", flush=True)
        del model, result
    return _save(protocol, rows, argv)


def screening_texts(tokenizer, eval_tokens: int) -> dict[str, torch.Tensor]:
    """The first ``eval_tokens`` tokens of Pride and Prejudice and of each bundled out-of-domain text."""
    texts = {"pride_and_prejudice": EVAL_TEXT.read_text(encoding="utf-8"),
             **{name: held_out_text(name) for name in OUT_OF_DOMAIN_SOURCES}}
    return {name: tokenize_for_perplexity(tokenizer, text, eval_tokens) for name, text in texts.items()}


def perplexities(model, evaluation: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: perplexity(model, ids) for name, ids in evaluation.items()}


def _calibration(recipe, arrangement, model, tokenizer, austen, cache) -> tuple[torch.Tensor, float]:
    """The calibration ids of a recipe and the seconds spent generating its self-generated part (0 if none)."""
    parts, generation_s = [], 0.0
    for part in recipe:
        if part[0] == "austen":
            parts.append(austen[: part[1]])
            continue
        _, count, temperature = part
        if (count, temperature) not in cache:
            started = time.perf_counter()
            ids = generate_calibration_ids(model, tokenizer, count, 128, seed=0, temperature=temperature)
            cache[(count, temperature)] = (ids, time.perf_counter() - started)
        ids, seconds = cache[(count, temperature)]
        parts.append(ids)
        generation_s += seconds
    if len(parts) == 1:
        return parts[0], generation_s
    if arrangement.startswith("interleave"):
        return mix_calibration_ids(*parts), generation_s
    return torch.cat(parts), generation_s


def _refit_on_data_only():
    """The refit folds fed with the data sequences only. Interleaved calibration puts the data at the even indices and
    every batch of 32 starts on one, so a batch's even rows are the data: they are split between the two folds (rows
    0::4 and 2::4), and the self-generated rows are left out of the fits."""
    from optimum_olica import olica

    original = olica._update_folds

    def data_folds(folds, inputs, targets):
        if inputs.ndim < 3 or inputs.shape[0] % 4:
            raise ValueError(f"refit on data only needs batches of 4k sequences, got {tuple(inputs.shape)}")
        original(folds, inputs[0::2], targets[0::2])  # even rows of the data rows: 0::4 and 2::4

    return mock.patch.object(olica, "_update_folds", data_folds)


def _dampings(report: dict) -> dict[str, list]:
    layers = report.get("layers") or []
    return {key: [layer.get(key) for layer in layers] for key in ("o_proj_refit_damping", "down_proj_refit_damping")
            if layers and key in layers[0]}


def _previous_rows(protocol: dict) -> list[dict]:
    """The rows of the results file measured on ``protocol`` (files from before the 33% runs held one ratio in
    their protocol: their rows get it), or none."""
    results_file = results_path(RESULTS, False)
    if not results_file.exists():
        return []
    previous = json.loads(results_file.read_text())
    previous_protocol, rows = dict(previous.get("protocol", {})), previous.get("rows", [])
    ratio = previous_protocol.pop("ratio", None)
    for row in rows:
        if row["variant"] != "dense":
            row.setdefault("ratio", ratio)
    return rows if previous_protocol == protocol else []


def _save(protocol: dict, rows: list[dict], argv) -> dict:
    results = {"protocol": protocol,
               "variants": {name: {"calibration": [list(part) for part in recipe], "arrangement": arrangement,
                                   "overrides": overrides, "description": description}
                            for name, (recipe, arrangement, overrides, description) in VARIANTS.items()
                            if any(row["variant"] == name for row in rows)},
               "rows": rows}
    return write_results(results_path(RESULTS, False), results, "calibration_screen.py", argv, False)


if __name__ == "__main__":
    main()
