"""Weight-only int8 of a pruned SmolLM2 in transformers: optimum-quanto and torchao, against the float32 checkpoint.

For the checkpoint given: the file size of each format as saved, and perplexity on the same token ids as
``bench/llamacpp.py`` (the first 4,096 tokens of the bundled Pride and Prejudice, windows of 128). Results:
``bench/results/quantization.json`` (the table of docs/deployment.md).

    python bench/quantization.py outputs/smollm2-olica-20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TorchAoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint_bytes, results_path, write_results  # noqa: E402

import optimum_olica  # noqa: E402,F401  (registers the pruned architecture)
from optimum_olica.evaluation import evaluation_token_ids, perplexity  # noqa: E402
from optimum_olica.loading import load_tokenizer  # noqa: E402

WINDOW = 128


def measure(checkpoint: Path, eval_tokens: int) -> list[dict]:
    from optimum.quanto import QuantizedModelForCausalLM, qint8
    from torchao.quantization import Int8WeightOnlyConfig

    token_ids = evaluation_token_ids(load_tokenizer(checkpoint), num_tokens=eval_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        rows.append({"format": "float32", "file_bytes": checkpoint_bytes(checkpoint),
                     "perplexity": perplexity(model, token_ids, sequence_length=WINDOW)})
        quanto_folder = Path(work) / "quanto"
        QuantizedModelForCausalLM.quantize(model, weights=qint8, exclude="lm_head").save_pretrained(quanto_folder)
        reloaded = QuantizedModelForCausalLM.from_pretrained(quanto_folder)
        rows.append({"format": "optimum-quanto int8 weights (exclude lm_head)", "file_bytes": checkpoint_bytes(quanto_folder),
                     "perplexity": perplexity(reloaded, token_ids, sequence_length=WINDOW)})
        torchao_folder = Path(work) / "torchao"
        quantized = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
        ).eval()
        quantized.save_pretrained(torchao_folder)
        reloaded = AutoModelForCausalLM.from_pretrained(torchao_folder).eval()
        rows.append({"format": "torchao int8 weight-only", "file_bytes": checkpoint_bytes(torchao_folder),
                     "perplexity": perplexity(reloaded, token_ids, sequence_length=WINDOW)})
    for row in rows:
        row["perplexity_ratio"] = row["perplexity"] / rows[0]["perplexity"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a pruned SmolLM2 folder")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = measure(args.checkpoint, args.eval_tokens)
    for row in rows:
        print(f"{row['format']}: {row['file_bytes'] / 1e6:.1f} MB, perplexity {row['perplexity']:.2f} "
              f"({row['perplexity_ratio']:.3f}x)")
    results = {
        "protocol": {"checkpoint": str(args.checkpoint), "evaluation": f"first {args.eval_tokens} tokens of Pride "
                     f"and Prejudice, windows of {WINDOW}, float32 activations"},
        "rows": rows,
    }
    return write_results(results_path("quantization", False), results, "bench/quantization.py", argv, False)


if __name__ == "__main__":
    main()
