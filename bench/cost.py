"""Pruning cost against the floor (issue 6, part 1).

SmolLM2-135M-Instruct in float32 on the CPU, pruned by 20% with 128 x 128 calibration tokens (seed 0, bundled Austen
text). The floor is one dense forward pass over the same calibration set (same batches as the pipeline), timed in
the same process: three times (before the prune, after it, and once more), the median is the denominator, so the
ratio compares measurements taken minutes apart on this shared machine rather than a lone absolute time. Target: at
most 2.5. The report's phase timings (capture, load, statistics, decomposition, refit, propagation, store) are
recorded as shares of the pruning time: the profile that names the next optimisation. The default calibration
without data of one's own (self_calibration="auto") also has the model write half of the sequences: that generation
is timed too, apart from the pruning, against the same floor.

    python bench/cost.py            # 128 x 128 tokens
    python bench/cost.py --quick    # 32 x 128 tokens; writes bench/results/cost_quick.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_forward_seconds, regenerate_report, results_path, write_results  # noqa: E402

TARGET_RATIO = 2.5
PRUNE_RATIO = 0.2
PHASES = ("capture", "allocation", "load", "statistics", "decomposition", "refit", "propagation", "store")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 x 128 calibration tokens (a smoke run)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 128; quick 32)")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--save-pruned", type=Path, default=None,
                        help="also save the pruned model there (bench-quick hands it to speed.py --pruned)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    args = parser.parse_args(argv)
    num_samples = args.num_samples or (32 if args.quick else 128)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_olica import OlicaConfig, generate_calibration_ids, prune_model
    from optimum_olica.data import get_calibration_dataset
    from optimum_olica.default_model import default_model_path
    from optimum_olica.pruner import CALIBRATION_TOKENS_PER_BATCH

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = get_calibration_dataset(tokenizer, "austen", num_samples, args.sequence_length, seed=0)
    batch_size = max(1, CALIBRATION_TOKENS_PER_BATCH // args.sequence_length)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dense_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # pruning replaces `model`'s
    dense_model(input_ids=calibration[:1], use_cache=False)  # warm-up: first-call allocations are not the floor

    forward_s = [dense_forward_seconds(dense_model, calibration, batch_size)]
    config = OlicaConfig(ratio=PRUNE_RATIO, num_samples=num_samples, sequence_length=args.sequence_length)
    started = time.perf_counter()
    result = prune_model(model, config, calibration, progress=False, device="cpu")
    prune_s = time.perf_counter() - started
    # What self_calibration="auto" adds without data of one's own: the model writes half of the sequences. Not part
    # of the pruning time (the report keeps it apart as calibration_data.generation_s); timed between the forwards.
    generated = OlicaConfig(num_samples=num_samples).self_generated_samples()
    started = time.perf_counter()
    generate_calibration_ids(dense_model, tokenizer, generated, args.sequence_length, seed=0)
    generation_s = time.perf_counter() - started
    forward_s += [dense_forward_seconds(dense_model, calibration, batch_size) for _ in range(2)]
    floor_s = statistics.median(forward_s)

    timings = result.report["timings"]
    phases = {phase: timings[f"{phase}_s"] for phase in PHASES}
    accounted = sum(phases.values())
    shares = {phase: seconds / prune_s for phase, seconds in phases.items()}
    shares["other"] = max(prune_s - accounted, 0.0) / prune_s  # planning, the LC choice, building the model
    ratio = prune_s / floor_s
    print(f"pruning {prune_s:.1f} s / dense forward {floor_s:.1f} s (runs {', '.join(f'{s:.1f}' for s in forward_s)})"
          f" = {ratio:.2f}x (target {TARGET_RATIO})", flush=True)
    print(f"generating {generated} sequences (self_calibration='auto' with the bundled text): {generation_s:.1f} s "
          f"= {generation_s / floor_s:.2f}x the dense forward", flush=True)
    print("profile: " + ", ".join(f"{phase} {100 * share:.0f}%" for phase, share in shares.items()), flush=True)
    results = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct (float32, CPU)",
            "calibration": f"{num_samples} x {args.sequence_length} tokens, seed 0, bundled Austen text",
            "ratio": PRUNE_RATIO,
            "floor": f"one dense forward over the calibration set in batches of {batch_size} sequences, median of 3 "
                     "(before the prune, and twice after)",
        },
        "prune_s": prune_s,
        "dense_forward_s": forward_s,
        "dense_forward_median_s": floor_s,
        "prune_over_dense_forward": ratio,
        "target_ratio": TARGET_RATIO,
        "phase_seconds": phases,
        "phase_shares": shares,
        "achieved_ratio": result.report["achieved_ratio"],
        "self_generated_samples": generated,
        "generation_s": generation_s,
        "generation_over_dense_forward": generation_s / floor_s,
        "torch_threads": torch.get_num_threads(),
    }
    if args.save_pruned is not None:
        from optimum_olica.checkpoint import save_pruned_model

        save_pruned_model(result.model, args.save_pruned, tokenizer=tokenizer, overwrite=True)
    write_results(results_path("cost", args.quick), results, "cost.py", argv, args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()
