"""The lm_eval suite: tasks of EleutherAI's lm-evaluation-harness, when it is installed, on the in-memory model.

Layer 6 (eval): imports models and eval.
"""

from __future__ import annotations

from posttrain.eval.common import SuiteArgs, SuiteResult
from posttrain.models.forward import evaluating

LM_EVAL_MISSING = "lm-eval-harness is not installed (pip install lm-eval); its task data must also be available locally"


def lm_eval_suite(model, tokenizer, path: str, a: SuiteArgs) -> SuiteResult:
    """Tasks of EleutherAI's lm-evaluation-harness (``options["tasks"]``) on the in-memory model through its HFLM
    wrapper; metrics are ``task/metric`` as the harness names them (e.g. ``hellaswag/acc,none``). ``path`` is unused:
    the harness reads its own task data."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(LM_EVAL_MISSING) from None
    tasks = a.options.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("the lm_eval suite needs options.tasks (a list of lm-eval task names)")
    with evaluating(model):
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=a.batch_size),
                                      tasks=list(tasks), limit=a.limit)
    metrics, hib = {}, {}
    for task, values in out["results"].items():
        directions = out.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            if "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metrics[f"{task}/{key}"] = float(value)
            hib[f"{task}/{key}"] = bool(directions.get(key.split(",")[0], True))
    return SuiteResult(metrics, hib)
