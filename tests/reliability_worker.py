"""Runs one pruning job in its own process, so a test can SIGKILL it (OLICA_FAULT_INJECTION) and start it again.

    python reliability_worker.py prune --base DIR --out DIR [--checkpoint DIR] [--streaming] [--overwrite]
    python reliability_worker.py save --out DIR [--overwrite] [--no-exchange]

``prune`` prunes the tiny model saved in ``--base`` (in memory, or streamed from its files) with a fixed recipe and
fixed calibration ids; ``save`` writes a small pruned model with ``save_pruned_model`` (for kills mid-write).
One intra-op thread, so every process computes the same floating-point results.
"""

from __future__ import annotations

import argparse
import sys

import torch

import optimum_olica  # noqa: F401
from optimum_olica import atomic_io
from optimum_olica.configuration import OlicaConfig
from optimum_olica.pruner import OlicaPruner

# Four layers and one calibrated layer: which layer gets the branch depends on candidates fitted before and after
# an interruption, so a resume that lost the algorithm's cross-layer state would choose differently.
RECIPE = OlicaConfig(ratio=0.25, num_calibrated_layers=1, calibration_rank_ratio=0.1)


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["prune", "save"])
    parser.add_argument("--base")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-exchange", action="store_true", help="force the two-rename replacement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.no_exchange:
        atomic_io._exchange = lambda first, second: False
    if args.action == "prune":
        pruner = OlicaPruner.from_pretrained(args.base, streaming=args.streaming, checkpoint_dir=args.checkpoint)
        pruner.prune(RECIPE, calibration_ids(), save_directory=args.out, overwrite=args.overwrite, progress=False)
    else:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from conftest import make_tiny_model

        pruner = OlicaPruner(make_tiny_model("llama_gqa", num_hidden_layers=2))
        pruner.prune(RECIPE, calibration_ids(), progress=False)
        pruner.save_pretrained(args.out, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
