"""Tensor-parallel probe, run by ``tests/test_transformers_features.py`` under ``torchrun --nproc_per_node 2``.

As a script: ``torchrun --standalone --nproc_per_node 2 tensor_parallel_worker.py RESULT.json STOCK OLICA... --mqa
MQA_CHECKPOINT``. Every process loads each checkpoint twice, on its own and with transformers' tensor parallelism
(``tp_plan="auto"``, gloo on CPU), and compares the logits. Pruned checkpoints load with ``trust_remote_code`` in a
process where optimum_olica cannot be imported, so the plan under test is the one saved beside the weights. Rank 0
writes the results as JSON (no pickle crosses the process boundary).
"""

from __future__ import annotations

import inspect
import json
import sys

import torch


def tensor_parallel_arguments() -> dict:
    """``from_pretrained`` arguments that shard the model over every process of the launch."""
    from transformers.distributed import DistributedConfig

    if "tp_plan" in inspect.signature(DistributedConfig).parameters:  # transformers >= 5.1x
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}  # transformers 5.0 - 5.x: the plan is a from_pretrained argument


def local_rows(parameter: torch.Tensor) -> int:
    """Rows of this process's part of a (possibly sharded) weight."""
    local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
    return local.shape[0]


def compare(checkpoint: str, input_ids: torch.Tensor) -> dict:
    from transformers import AutoModelForCausalLM

    single = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    parallel = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, **tensor_parallel_arguments())
    parallel.eval()
    with torch.no_grad():
        expected, actual = single(input_ids).logits, parallel(input_ids).logits
    result = {"max_difference": (actual - expected).abs().max().item(), "local_rows": {}}
    # How much of each projection this process holds: proves the plan splits the model instead of replicating it.
    for name, parameter in parallel.named_parameters():
        if ".layers." in name and name.endswith("weight") and "norm" not in name:
            result["local_rows"][name] = [local_rows(parameter), dict(single.named_parameters())[name].shape[0]]
    if getattr(parallel.config, "query_ranks", None) is not None:
        try:
            parallel.train()
            result["train_error"] = None
        except NotImplementedError as error:
            result["train_error"] = str(error)
    return result


def main(argv: list[str]) -> None:
    sys.modules["optimum_olica"] = None  # as on a machine without the plugin: `import optimum_olica` fails
    import torch.distributed as dist

    torch.manual_seed(0)
    input_ids = torch.randint(3, 128, (2, 7))
    result_path, checkpoints = argv[0], argv[1 : argv.index("--mqa")]
    results = {checkpoint: compare(checkpoint, input_ids) for checkpoint in checkpoints}
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(argv[-1], trust_remote_code=True, **tensor_parallel_arguments())
        results["mqa_error"] = None
    except ValueError as error:
        results["mqa_error"] = str(error)
    if dist.get_rank() == 0:
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
