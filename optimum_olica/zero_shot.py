"""Zero-shot accuracy through lm-evaluation-harness, on a model already in memory.

`evaluate_zero_shot` wraps the model and tokenizer in lm-eval's ``HFLM`` (which accepts a model instance) and runs
``lm_eval.simple_evaluate`` on the requested tasks, so a pruned model is evaluated without saving and reloading it,
with the plugin or after a ``trust_remote_code`` load alike. Checked with lm-eval 0.4.13 and transformers 5.23: the
stock ``HFLM`` works unchanged with a transformers 5 model instance, so no wrapper is needed.

The package ships one task that needs no download, ``austen_cloze`` (``resources/lm_eval_tasks/``): 100
sentence-ending items from Pride and Prejudice, four choices each, chance 25%. Its folder is always on lm-eval's
task search path here; from the ``lm_eval`` command line use ``--include_path`` with `bundled_tasks_dir`. Standard
tasks (``piqa``, ``arc_easy``, ...) download their data from the Hub on first use.

lm-eval is an optional dependency (the ``eval`` extra) and is imported only when an evaluation runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "BUNDLED_TASKS",
    "LmEvalNotInstalledError",
    "bundled_tasks_dir",
    "evaluate_zero_shot",
    "parse_task_names",
]

BUNDLED_TASKS = ("austen_cloze",)
_INSTALL_HINT = "zero-shot evaluation needs lm-eval: pip install 'optimum-olica[eval]'"


class LmEvalNotInstalledError(ImportError):
    """lm-evaluation-harness is not installed; the message gives the pip command."""


def bundled_tasks_dir() -> Path:
    """The folder of the task configs shipped with the package (pass it to lm-eval's ``--include_path``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("optimum_olica").joinpath("resources", "lm_eval_tasks")))


def parse_task_names(tasks: str | Sequence[str]) -> list[str]:
    """``"piqa,arc_easy"`` or ``["piqa", "arc_easy"]`` -> ``["piqa", "arc_easy"]`` (blanks dropped, order kept)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for name in names if name and name.strip()]
    if not names:
        raise ValueError(f"No task names in {tasks!r}: give e.g. 'austen_cloze' or 'piqa,arc_easy'.")
    return names


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise LmEvalNotInstalledError(f"{_INSTALL_HINT} ({error})") from error
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _metrics_of(task_results: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.7, "acc_stderr,none": 0.04, "alias": ...}`` -> ``{"acc": 0.7, "acc_stderr": 0.04}``.

    The default filter's ``,none`` suffix is dropped; other filters keep theirs (``"exact_match,strict-match"``).
    Non-numeric entries (aliases, ``"N/A"`` standard errors) are left out.
    """
    metrics = {}
    for key, value in task_results.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


def _task_manager(TaskManager, task_names: list[str], include_path):
    """lm-eval's task index over the bundled folder and ``include_path``; refuses names it does not know."""
    extra_paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    )
    search_paths = [str(bundled_tasks_dir())] + [str(Path(path).expanduser().resolve()) for path in extra_paths]
    # Indexing lm-eval's own few thousand task YAMLs takes tens of seconds on a small machine: skip it when the
    # requested tasks are all in the bundled or included folders.
    task_manager = TaskManager(include_path=search_paths, include_defaults=False)
    if not all(name in task_manager.task_index or os.path.isfile(name) for name in task_names):
        task_manager = TaskManager(include_path=search_paths)
    unknown = [name for name in task_names if name not in task_manager.task_index and not os.path.isfile(name)]
    if unknown:
        raise ValueError(
            f"Unknown lm-eval task(s): {', '.join(unknown)}. The bundled offline task is {BUNDLED_TASKS[0]!r}; "
            f"`lm_eval ls tasks` lists lm-eval's own; a custom task folder goes in include_path."
        )
    return task_manager


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = BUNDLED_TASKS,
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    random_seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Runs lm-evaluation-harness tasks on an in-memory causal LM and returns the metrics per task.

    Args:
        model: a loaded ``PreTrainedModel`` (pruned or not, on any device; it is put in eval mode).
        tokenizer: its tokenizer.
        tasks: task names, as a list or a comma-separated string (``"austen_cloze"``, ``"piqa,arc_easy"``); lm-eval
            groups and paths to task YAML files work too.
        batch_size: sequences per forward pass.
        limit: evaluate only the first ``limit`` documents of each task (a float in (0, 1): that fraction). For
            quick checks; accuracies on a subset are not comparable with published figures.
        include_path: extra folders of task YAMLs, searched besides the bundled one (`bundled_tasks_dir`).
        num_fewshot: in-context examples per prompt (None: each task's default, zero for the bundled task).
        max_length: the longest input in tokens (None: lm-eval reads it from the model config).
        random_seed: seed of lm-eval's Python, numpy and torch generators (few-shot sampling, shuffling).

    Returns:
        ``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_stderr``, ``acc_norm``, ...; the
        default filter's ``,none`` suffix dropped) and ``num_samples``, the number of documents evaluated. Groups
        lm-eval reports (e.g. ``mmlu``) appear beside their tasks.

    Raises:
        LmEvalNotInstalledError: (an ``ImportError``) lm-eval is not installed.
        ValueError: a task name lm-eval does not know.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()

    task_names = parse_task_names(tasks)
    task_manager = _task_manager(TaskManager, task_names, include_path)

    model.eval()
    # backend="causal": lm-eval guesses the backend from the model type, and the pruned types (olica_llama, ...)
    # are not in transformers' causal-LM table, so the guess would only end in a warning.
    with _quiet_logger("lm_eval.models.huggingface"):  # its warnings about passing a model instance are expected
        lm = HFLM(
            pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size, max_length=max_length
        )
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        random_seed=random_seed,
        numpy_random_seed=random_seed,
        torch_random_seed=random_seed,
        fewshot_random_seed=random_seed,
    )
    if output is None:  # only non-zero ranks of a distributed run get None; this function is single-process
        raise RuntimeError("lm-eval returned no results (a distributed launch is not supported here).")

    counts = output.get("n-samples", {})
    results = {}
    for name, task_results in output["results"].items():
        metrics = _metrics_of(task_results)
        if name in counts:
            metrics["num_samples"] = counts[name]["effective"]
        results[name] = {key: value for key, value in metrics.items() if not math.isnan(value)}
    return results
