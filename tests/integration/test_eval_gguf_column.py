"""eval's third column for real: the exported GGUF (here the embedded model's) answers the same prompts through
llama.cpp in a child process (finetune.gguf.runtime). The eval stage on a tiny model: tests/unit/test_eval.py."""

from __future__ import annotations

from pathlib import Path

from eval_fixtures import arithmetic_rows, make_recipe

from finetune import evaluate as ft_eval
from finetune.run import artifacts


def exported(gguf: dict[str, Path]) -> artifacts.Exported:
    return artifacts.Exported(merged=Path("merged"), gguf=gguf)


def test_gguf_column_answers_the_same_prompts_through_llama_cpp(tmp_path, tiny_model_dir):
    """The third column: the exported GGUF (here the embedded model's real GGUF) answers through finetune.gguf.runtime."""
    from finetune import models

    recipe = make_recipe(tmp_path, tiny_model_dir, eval={"gguf_quant": "Q4_1", "max_new_tokens": 8})
    gguf = models.embedded_gguf_path()
    examples = arithmetic_rows(3)
    answers, variants = {}, {}
    status = ft_eval._gguf_column(recipe, exported({"Q4_1": gguf}), examples, answers, variants,
                                  ["exact_match"], recipe.eval)
    assert status["status"] == "scored" and status["variant"] == "gguf-Q4_1"
    outs = answers["gguf-Q4_1"]
    assert len(outs) == 3 and all(o["finish_reason"] in ("stop", "length") for o in outs)
    assert any(o["text"] for o in outs)
    assert variants["gguf-Q4_1"]["runtime"] == "llama.cpp"

    missing = ft_eval._gguf_column(recipe, exported({"Q8_0": gguf}), examples, {}, {},
                                   ["exact_match"], recipe.eval)
    assert missing["status"] == "absent" and "has no Q4_1 GGUF (it has: Q8_0)" in missing["reason"]


def test_several_llama_cpp_processes_answer_exactly_as_one(tmp_path):
    """The GGUF column answers with several worker processes at once: every example gets the reply one process
    gives it, in the examples' order, whichever worker answered it."""
    from finetune import eval_models, models

    gguf = models.embedded_gguf_path()
    examples = arithmetic_rows(5)
    kw = dict(reasoning="auto", max_new_tokens=12, temperature=0.0, n_ctx=512, seed=0)
    one, template = eval_models.gguf_generate(gguf, examples, processes=1, **kw)
    three, template3 = eval_models.gguf_generate(gguf, examples, processes=3, **kw)
    assert one == three and template == template3 and len(one) == 5
    assert len({o["text"] for o in one}) > 1  # different prompts, different answers: the order is checked
    assert 1 <= eval_models.gguf_processes(gguf, 2) <= 2 and eval_models.gguf_processes(gguf, 100) >= 1
