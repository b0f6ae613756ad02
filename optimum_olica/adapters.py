"""Fine-tuning adapters (peft) on pruned models: which modules a target list means when Q/K are factored.

peft adapts the modules whose names end with a target (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``) and
supports ``nn.Linear``, not a module made of two. A factored ``q_proj`` is ``up(down(x))`` with two linears, so the
usual Llama list fails in peft with "Target module OlicaLowRankLinear(...) is not supported". This module turns such
a list into the exact names peft can adapt: a dense projection stays itself, a factored one becomes its two factors.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def is_factored_projection(module: nn.Module) -> bool:
    """Whether ``module`` is a projection stored as two linears, ``up(down(x))`` (``OlicaLowRankLinear``).

    Checked by structure, not by class: a checkpoint loaded with ``trust_remote_code`` has its own copy of the class.
    """
    down, up = getattr(module, "down", None), getattr(module, "up", None)
    return not isinstance(module, nn.Linear) and isinstance(down, nn.Linear) and isinstance(up, nn.Linear)


def peft_target_modules(model: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """The names of the modules a peft adapter must target to adapt ``target_modules`` of a pruned model.

    A name matches as in peft (the module's full name, or its last components). A dense projection is kept; a
    factored ``q_proj`` / ``k_proj`` becomes ``q_proj.down`` and ``q_proj.up``, so the adapter changes the whole
    ``q_proj`` map (through both factors) and merging it (``merge_and_unload``) keeps the factored format. The
    result is a list of full module names: peft saves it in ``adapter_config.json``, and the adapter reloads with
    plain ``PeftModel.from_pretrained`` onto the same pruned checkpoint.

    Args:
        model: the pruned model (an Olica causal LM), before peft wraps it.
        target_modules: the names you would give peft for the base family, e.g.
            ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``.

    Returns:
        Full module names, for ``LoraConfig(target_modules=...)``.

    Raises:
        ValueError: if ``target_modules`` is a string (peft reads it as a pattern: pass a list), or a name matches no
            module of the model.

    Example:
        ```python
        from peft import LoraConfig, get_peft_model
        from optimum_olica import peft_target_modules

        targets = peft_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
        ```
    """
    if isinstance(target_modules, str):
        raise ValueError(
            f"target_modules={target_modules!r} is a string, which peft reads as a pattern: pass a list of module "
            "names such as ['q_proj', 'v_proj'] ('all-linear' needs no translation: give it to peft directly)."
        )
    targets = list(target_modules)
    names, unmatched = [], set(targets)
    for name, module in model.named_modules():
        matched = {target for target in targets if name == target or name.endswith(f".{target}")}
        if not matched:
            continue
        unmatched -= matched
        names += [f"{name}.down", f"{name}.up"] if is_factored_projection(module) else [name]
    if unmatched:
        raise ValueError(
            f"No module of {type(model).__name__} is named {sorted(unmatched)}; its projections are q_proj, k_proj, "
            "v_proj, o_proj, gate_proj, up_proj and down_proj."
        )
    return names


__all__ = ["is_factored_projection", "peft_target_modules"]
