"""export refusing before it converts anything. export end to end on a tiny model (merge, llama.cpp conversion,
quantization, adapter GGUF, parity, Modelfiles): tests/integration/test_export_tiny_model.py."""

from __future__ import annotations

import pytest


def test_export_before_train_names_the_command(tmp_path):
    from finetune import export
    from finetune import recipe as recipe_mod
    from finetune.errors import UserError

    recipe = recipe_mod.validate_dict({"name": "nothing", "runs_dir": str(tmp_path)})
    with pytest.raises(UserError, match="finetune train"):
        export.run(recipe)



@pytest.mark.parametrize("config", [{"peft_type": "LORA", "use_dora": True},
                                    {"peft_type": "LORA", "use_dora": False,
                                     "target_parameters": ["mlp.experts.down_proj"]}])
def test_adapters_llama_cpp_cannot_load_get_no_adapter_gguf(tmp_path, config):
    """DoRA and LoRA on expert tensors (as their adapter_config.json says) have no llama.cpp adapter GGUF: export
    converts nothing for them and says to use the merged GGUFs."""
    import json

    from finetune import export

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert export._adapter_config(adapter) == config and export._is_dora(adapter) is config["use_dora"]
    messages: list[str] = []
    assert export._adapter_ggufs("a", tmp_path, adapter, tmp_path / "base", None, messages.append) == (None, None)
    assert "use the merged GGUFs" in messages[0] and not list(tmp_path.glob("*.gguf"))


def test_a_folder_without_adapter_config_reads_as_an_empty_config(tmp_path):
    from finetune import export

    assert export._adapter_config(tmp_path) == {} and export._is_dora(tmp_path) is False


# ------------------------------------------------------------------- one GGUF for Ollama, serve, chat and eval
def _exported(tmp_path, types, picked=None):
    from finetune.run import artifacts

    return artifacts.Exported(merged=tmp_path / "merged", gguf={t: tmp_path / f"m-{t}.gguf" for t in types},
                              picked=picked)


@pytest.mark.parametrize(("types", "picked", "asked", "served"), [
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", None, "Q4_K_M"),   # the picked type, not serve.quant's default Q8_0
    (["F16", "Q8_0", "Q4_K_M"], None, None, "Q8_0"),          # nothing picked: Q8_0
    (["F16", "Q4_K_M", "Q5_K_M"], None, None, "Q4_K_M"),      # no Q8_0: the first quantized type
    (["F16"], None, None, "F16"),
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", "F16", "F16"),      # asked for: that one
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", "auto", "Q4_K_M"),
])
def test_the_gguf_to_serve_is_one_rule(tmp_path, types, picked, asked, served):
    assert _exported(tmp_path, types, picked).gguf_to_serve(asked) == served


def test_asking_for_a_type_the_export_lacks_names_what_it_has(tmp_path):
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"no Q8_0 GGUF \(it has: F16, Q4_K_M\)"):
        _exported(tmp_path, ["F16", "Q4_K_M"]).gguf_to_serve("Q8_0")
    with pytest.raises(UserError, match="auto needs export.fit_gb"):
        _exported(tmp_path, ["F16", "Q4_K_M"]).gguf_to_serve("auto")


def test_only_a_written_key_counts_as_asked_for(tmp_path):
    from finetune import recipe as recipe_mod
    from finetune.run import artifacts

    default = recipe_mod.validate_dict({"name": "a"})
    written = recipe_mod.validate_dict({"name": "a", "serve": {"quant": "Q8_0"}})
    assert default.serve.quant == "Q8_0" and artifacts.requested(default.serve, "quant") is None
    assert artifacts.requested(written.serve, "quant") == "Q8_0"


def test_serve_and_eval_use_the_picked_type_unless_told_otherwise(tmp_path, gguf, repo_root):
    """The quickstart's export picks Q4_K_M for export.fit_gb: serve, chat and eval's GGUF column take it (as the
    Modelfile does) while serve.quant is left at its default; an explicit serve.quant or eval.gguf_quant wins."""
    from finetune import evaluate
    from finetune import recipe as recipe_mod
    from finetune.run import artifacts
    from finetune.run.runs import StageRun
    from finetune.serve_target import resolve_target

    recipe_path = str(repo_root / "recipes" / "quickstart.yaml")
    overrides = [f"runs_dir={tmp_path}"]
    r = recipe_mod.load(recipe_path, overrides)
    files = {}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        files[t] = tmp_path / f"quickstart-{t}.gguf"
        files[t].symlink_to(gguf)
    with StageRun(r, "export") as stage:
        stage.record(artifacts.Exported(merged=tmp_path / "merged", gguf=files, picked="Q4_K_M"))
    assert resolve_target(recipe_path, overrides).gguf == gguf.resolve()
    assert resolve_target(recipe_path, overrides).name == "quickstart-Q4_K_M"
    assert resolve_target(recipe_path, [*overrides, "serve.quant=Q8_0"]).name == "quickstart-Q8_0"

    exported = artifacts.load(r, artifacts.Exported, fresh=False)
    for t in files.values():
        t.unlink()  # eval stops at the missing file, after choosing it: the reason names the one it chose

    def chosen(recipe):
        status = evaluate._gguf_column(recipe, exported, [], {}, {}, ["exact_match"], recipe.eval)
        return status["reason"]

    assert "quickstart-Q4_K_M.gguf is missing" in chosen(r)
    assert "quickstart-F16.gguf is missing" in chosen(recipe_mod.load(recipe_path, [*overrides, "serve.quant=F16"]))
    assert "quickstart-Q8_0.gguf is missing" in chosen(recipe_mod.load(
        recipe_path, [*overrides, "serve.quant=F16", "eval.gguf_quant=Q8_0"]))


@pytest.mark.parametrize(("trained", "model", "num_ctx"), [
    (256, 8192, 2048),     # the quickstart's 256-token rows: 2048, not the model's 8192
    (3000, 8192, 4096),    # rounded up to a power of two
    (1024, 1024, 1024),    # never more than the model's own context
    (200_000, 131072, 32768),
])
def test_num_ctx_follows_the_training_length(trained, model, num_ctx):
    from finetune.gguf import ollama

    assert ollama.context_length(trained, model) == num_ctx


def test_the_dominant_system_prompt_of_the_training_rows():
    from finetune.run import artifacts

    def row(system):
        return {"messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}

    assert artifacts.dominant_system_prompt([row("Summarize."), row("Summarize."), row(None)]) == "Summarize."
    assert artifacts.dominant_system_prompt([row("Summarize."), row("Other."), row(None)]) is None
    assert artifacts.dominant_system_prompt([{"text": "plain"}]) is None


def test_the_trained_system_prompt_prefers_the_recipes(tmp_path):
    from finetune.run import artifacts

    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "system", "content": "From the rows."}, {"role": "user", "content": "q"}]}\n')
    prepared = artifacts.Prepared(splits={"train": train}, tokenized={}, rows={"train": 1}, report=tmp_path / "r",
                                  lengths_png=tmp_path / "l")
    assert artifacts.trained_system_prompt(None, prepared) == "From the rows."
    assert artifacts.trained_system_prompt("Set.", prepared) == "Set."  # data.system_prompt, when the recipe sets it
    assert artifacts.trained_system_prompt(None, None) is None


def test_modelfile_carries_the_trained_system_prompt_and_context(tmp_path, gguf, tokenizer_dir):
    """The Modelfile of the served type, SYSTEM from training (not SmolLM's default), num_ctx from the rows."""
    from transformers import AutoTokenizer

    from finetune import export

    ggufs = {}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        ggufs[t] = tmp_path / f"m-{t}.gguf"
        ggufs[t].symlink_to(gguf)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    export._modelfiles(tmp_path, ggufs, tokenizer, outtype="F16", default="Q4_K_M",
                       system_prompt="Summarize the ticket as JSON.", trained_tokens=256, log=lambda *_: None)
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m-Q4_K_M.gguf" in text and "PARAMETER num_ctx 2048" in text
    assert 'SYSTEM """Summarize the ticket as JSON."""' in text and "SmolLM" not in text
    assert "trained with" in text
    export._modelfiles(tmp_path, ggufs, tokenizer, outtype="F16", default="Q8_0", log=lambda *_: None)
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./m-Q8_0.gguf" in text and 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
