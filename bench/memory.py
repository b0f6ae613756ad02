"""Peak memory of pruning in streaming mode, against the checkpoint's size on disk (issue 6, part 2).

A random-initialised Llama-architecture model of about 1.5B parameters (float32, about 5.9 GB of safetensors; built
once under ~/.cache/optimum_olica/bench, one layer at a time) is pruned by 20% in a child process, which is then
measured: peak resident memory (``ru_maxrss`` of that child, from ``wait4``; a /proc poll cross-checks it) divided by
the checkpoint's size on disk. Target for streaming (``OlicaPruner.from_pretrained(dir, streaming=True)``): at most
0.35. The normal fully-loaded mode is measured the same way for contrast. The peak includes the Python, torch and
transformers runtime itself (recorded as ``baseline_rss``).

The refit damping is fixed (``--refit-damping``, default 0.1) instead of the shipped ``"auto"``: the cross-validation
that picks it adds many Cholesky solves and ``W G`` products on (intermediate x intermediate) Gram matrices per layer
(several minutes more for this model on 2 cores) but allocates no buffer that the fixed-damping refit does not (both fold
Gram matrices, then one factorisation at a time), so the peak is the same; pass ``--refit-damping auto`` to measure
the shipped setting as it is.

    python bench/memory.py           # 1.5B model, 16 x 128 tokens (about 5 min streaming + 11 min loaded on 2 quiet
                                     # cores: the per-layer SVDs and solves on width-2048/5632 matrices dominate)
    python bench/memory.py --modes streaming   # re-measure one mode, keeping the other's run from the results file
    python bench/memory.py --quick   # 0.1B model, 8 x 64 tokens; writes bench/results/memory_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CACHE_DIR,
    LLAMA_1_5B,
    LLAMA_100M,
    checkpoint_bytes,
    git_commit,
    random_llama_checkpoint,
    regenerate_report,
    results_path,
    write_results,
)

TARGET_STREAMING_RATIO = 0.35
PRUNE_RATIO = 0.2


def _rss_bytes(pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def child(args) -> None:
    """The measured process: prune the checkpoint in one mode and save the result, nothing else."""
    import torch

    from common import random_token_ids
    from optimum_olica import OlicaConfig, OlicaPruner

    baseline = _rss_bytes()
    shape = json.loads((Path(args.checkpoint) / "shape.json").read_text())
    ids = random_token_ids(args.num_samples, args.sequence_length, shape["vocab_size"])
    damping = None if args.refit_damping == "none" else (
        "auto" if args.refit_damping == "auto" else float(args.refit_damping))
    config = OlicaConfig(ratio=PRUNE_RATIO, num_samples=args.num_samples, sequence_length=args.sequence_length,
                         refit_damping=damping)
    started = time.perf_counter()
    pruner = OlicaPruner.from_pretrained(args.checkpoint, streaming=args.child == "streaming")
    loaded = time.perf_counter() - started
    pruner.prune(config, calibration_dataset=ids, save_directory=args.save_directory, overwrite=True, progress=False,
                 device="cpu")
    seconds = time.perf_counter() - started
    Path(args.child_output).write_text(json.dumps({
        "baseline_rss_bytes": baseline,
        "load_s": loaded,
        "total_s": seconds,
        "achieved_ratio": pruner.report["achieved_ratio"],
        "torch_threads": torch.get_num_threads(),
        "timings": {k: v for k, v in pruner.report["timings"].items() if k != "per_layer_s"},
    }))


def measure(mode: str, checkpoint: Path, num_samples: int, sequence_length: int, refit_damping: str) -> dict:
    """Run the child for ``mode`` and return its peak RSS (wait4) and the /proc-polled peak."""
    work = CACHE_DIR / "memory-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    child_output = work / "child.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", mode, "--checkpoint", str(checkpoint),
        "--num-samples", str(num_samples), "--sequence-length", str(sequence_length), "--refit-damping", refit_damping,
        "--save-directory", str(work / "pruned"), "--child-output", str(child_output),
    ]
    process = subprocess.Popen(command)
    polled_peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal polled_peak
        while not done.is_set():
            polled_peak = max(polled_peak, _rss_bytes(process.pid) or 0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    # wait4 returns the resource usage of exactly this child (RUSAGE_CHILDREN would be the max over all children).
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    poller.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the {mode} child failed with exit code {process.returncode}: {' '.join(command)}")
    result = json.loads(child_output.read_text())
    pruned_bytes = checkpoint_bytes(work / "pruned")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": mode,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
        "polled_peak_rss_bytes": polled_peak,
        "pruned_checkpoint_bytes": pruned_bytes,
        **result,
    }


def _kept_runs(quick: bool, modes: list[str], num_samples: int, sequence_length: int, refit_damping: str,
               size: int) -> list[dict]:
    """The runs of the other modes from the existing results file, when it measured the same checkpoint and
    settings (so `--modes streaming` re-measures one mode without discarding the other); each run names its commit."""
    path = results_path("memory", quick)
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    protocol = previous.get("protocol", {})
    same = (previous.get("checkpoint_bytes") == size and protocol.get("refit_damping") == refit_damping
            and protocol.get("calibration") == f"{num_samples} x {sequence_length} random token ids")
    return [run for run in previous.get("runs", []) if same and run["mode"] not in modes]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.1B model, 8 x 64 tokens (a smoke run)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration sequences (default 16; quick 8)")
    parser.add_argument("--sequence-length", type=int, default=None, help="tokens per sequence (default 128; quick 64)")
    parser.add_argument("--modes", default="streaming,loaded", help="comma-separated: streaming, loaded")
    parser.add_argument("--refit-damping", default="0.1", help="a number, 'auto' (the shipped default) or 'none'")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the benchmarks page")
    parser.add_argument("--child", choices=["streaming", "loaded"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--save-directory", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return None
    num_samples = args.num_samples or (8 if args.quick else 16)
    sequence_length = args.sequence_length or (64 if args.quick else 128)
    shape = LLAMA_100M if args.quick else LLAMA_1_5B

    started = time.perf_counter()
    checkpoint = random_llama_checkpoint(shape, "float32")
    print(f"checkpoint {checkpoint} ready in {time.perf_counter() - started:.0f} s", flush=True)
    size = checkpoint_bytes(checkpoint)
    modes = args.modes.split(",")
    runs = _kept_runs(args.quick, modes, num_samples, sequence_length, args.refit_damping, size)
    for mode in modes:
        run = measure(mode, checkpoint, num_samples, sequence_length, args.refit_damping)
        run["peak_over_checkpoint"] = run["peak_rss_bytes"] / size
        run["commit"] = git_commit()
        runs.append(run)
        print(f"{mode}: peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB = {run['peak_over_checkpoint']:.3f} x "
              f"checkpoint ({size / 2**30:.2f} GiB), pruning {run['total_s']:.0f} s", flush=True)
    results = {
        "protocol": {
            "model": f"random-initialised Llama, {shape.num_parameters() / 1e9:.2f}B parameters, float32",
            "shape": shape.__dict__,
            "calibration": f"{num_samples} x {sequence_length} random token ids",
            "ratio": PRUNE_RATIO,
            "refit_damping": args.refit_damping,
            "measure": "peak RSS of the pruning child process (ru_maxrss from wait4) / checkpoint size on disk",
        },
        "checkpoint_bytes": size,
        "parameters": shape.num_parameters(),
        "target_streaming_ratio": TARGET_STREAMING_RATIO,
        "runs": runs,
    }
    write_results(results_path("memory", args.quick), results, "memory.py", argv, args.quick)
    if not args.no_report:
        regenerate_report(args.quick)
    return results


if __name__ == "__main__":
    main()
