"""Runs lm-eval on a checkpoint loaded with ``trust_remote_code=True`` while optimum_olica cannot be imported.

As a script: ``python lm_eval_probe.py CHECKPOINT TASKS_DIR TASK LIMIT OUTPUT.json``. This is what a user without the
plugin does: the model classes come from the modeling files saved beside the weights, and lm-eval's own ``HFLM`` and
``simple_evaluate`` run the task found in ``TASKS_DIR``. Writes the task's lm-eval results, the number of documents
evaluated and the loaded model's module as JSON.
"""

import json
import sys


def main(argv: list[str]) -> None:
    sys.modules["optimum_olica"] = None  # makes `import optimum_olica` raise ImportError, as where it is not installed
    checkpoint, tasks_dir, task, limit, output_path = argv[:5]

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)  # else it asks about the auto_map
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=8)
    output = simple_evaluate(
        model=lm,
        tasks=[task],
        limit=int(limit),
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        log_samples=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    result = {
        "results": output["results"][task],
        "num_samples": output["n-samples"][task]["effective"],
        "model_module": type(model).__module__,
        "optimum_olica_imported": isinstance(sys.modules.get("optimum_olica"), type(sys)),
    }
    with open(output_path, "w", encoding="utf-8") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1:])
