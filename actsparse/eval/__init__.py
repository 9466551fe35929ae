"""Evaluation: WikiText-2 perplexity and zero-shot accuracy (piqa, arc_easy, winogrande, lambada).

Used to compare a dense model with its sparse compiled version in the same run::

    from actsparse.eval import run_eval
    print(run_eval(model, tokenizer, ["wikitext2", "piqa"], limit=200, ppl_tokens=8192).table())
"""

from .data import TASKS, load_task, load_wikitext2, wikitext2_articles
from .masked import masked
from .perplexity import PerplexityResult, perplexity
from .results import EvalResult, run_eval
from .tasks import TaskResult, evaluate_task

__all__ = [
    "TASKS",
    "EvalResult",
    "PerplexityResult",
    "TaskResult",
    "evaluate_task",
    "load_task",
    "load_wikitext2",
    "masked",
    "perplexity",
    "run_eval",
    "wikitext2_articles",
]
