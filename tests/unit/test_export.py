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


# ------------------------------------------------------------------- the stage: its record, read from the final folder
def _fake_export(tmp_path, monkeypatch, runs_dir: str | None = None):
    """A recipe, a trained adapter, and export_model / the cards replaced by a stand-in that writes the files a real
    export writes (in the folder it is given) and returns what the real one returns (the GGUFs' paths absolute, as
    llama.cpp's converter is given them)."""
    from finetune import card, export
    from finetune import recipe as recipe_mod
    from finetune.run import artifacts

    recipe = recipe_mod.validate_dict({"name": "demo", "runs_dir": runs_dir or str(tmp_path / "runs"),
                                       "export": {"quantizations": ["Q8_0"]}})
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    adapter.mkdir()
    base.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    trained = artifacts.Trained(method="lora", adapter=adapter, base_model=base, log=tmp_path / "log.jsonl",
                                summary=tmp_path / "summary.json", tensorboard=tmp_path / "tb")
    written: list = []

    def export_model(*, name, out_dir, **_):
        written.append(out_dir)
        (out_dir / "merged").mkdir(parents=True)
        ggufs = {q: out_dir / f"{name}-{q}.gguf" for q in ("F16", "Q8_0")}
        for i, path in enumerate(ggufs.values()):
            path.write_bytes(b"g" * (10 + i))
        for file in ("parity.json", "quantization.json"):
            (out_dir / file).write_text("{}")
        summary = {"ok": True, "tokenization_exact": True, "chat_prompt_exact": True,
                   "F16": {"top1_agreement": 1.0, "min_top1": 0.99, "kl_mean": 0.0, "ppl_gguf": 2.0,
                           "ppl_reference": 2.0}}
        return {"merged": str(out_dir / "merged"), "merge": {}, "gguf": {q: str(p.resolve()) for q, p in ggufs.items()},
                "sizes": {q: p.stat().st_size for q, p in ggufs.items()}, "adapter_gguf": None, "base_gguf": None,
                "parity": str(out_dir / "parity.json"), "parity_summary": summary, "warnings": ["a warning"],
                "seconds": {"merge": 1.0, "total": 2.5}, "quantization": str(out_dir / "quantization.json"),
                "picked": None, "quantization_chart": None, "imatrix": None, "served": "Q8_0"}

    monkeypatch.setattr(export, "export_model", export_model)
    monkeypatch.setattr(card, "write_export_cards", lambda *a, **k: None)
    return recipe, artifacts.Upstream(trained=trained), written


def test_export_returns_its_record_with_the_paths_of_the_folder_swapped_in(tmp_path, monkeypatch):
    from finetune import export
    from finetune.run import artifacts

    recipe, upstream, written = _fake_export(tmp_path, monkeypatch)
    out = recipe.run_dir("export")
    out.mkdir(parents=True)
    (out / "old.gguf").write_text("the previous export")
    exported = export.run(recipe, upstream, log=lambda *_: None)
    assert written == [recipe.run_dir() / ".export.partial"]  # built aside, then swapped in
    assert isinstance(exported, artifacts.Exported) and exported.manifest_id
    assert exported == artifacts.from_folder(artifacts.Exported, out)
    assert exported.merged == out / "merged" and exported.merged.is_dir()
    assert exported.gguf == {"F16": out / "demo-F16.gguf", "Q8_0": out / "demo-Q8_0.gguf"}
    assert exported.parity == out / "parity.json" and exported.quantization == out / "quantization.json"
    assert exported.adapter_gguf is None and exported.imatrix is None and exported.quantization_chart is None
    assert all(p.exists() for p in exported.gguf.values()) and not (out / "old.gguf").exists()
    assert not (recipe.run_dir() / ".export.partial").exists()
    assert artifacts.summary(recipe, artifacts.Exported) == {
        "sizes": {"F16": 10, "Q8_0": 11}, "parity": {"ok": True, "tokenization_exact": True, "chat_prompt_exact": True,
                                                     "F16": {"top1_agreement": 1.0, "min_top1": 0.99, "kl_mean": 0.0,
                                                             "ppl_gguf": 2.0, "ppl_reference": 2.0}},
        "warnings": ["a warning"], "seconds": {"merge": 1.0, "total": 2.5}}
    assert not hasattr(export, "_relocated")


def test_export_under_a_relative_runs_dir_records_the_final_paths(tmp_path, monkeypatch):
    """runs_dir: runs (the shipped recipes' default) gives a relative work folder while the converter's paths are
    absolute: the record still names the files where they lie once swapped in."""
    from finetune import export

    monkeypatch.chdir(tmp_path)
    recipe, upstream, _ = _fake_export(tmp_path, monkeypatch, runs_dir="runs")
    exported = export.run(recipe, upstream, log=lambda *_: None)
    out = recipe.run_dir("export")
    assert {q: p.resolve() for q, p in exported.gguf.items()} == {
        "F16": (out / "demo-F16.gguf").resolve(), "Q8_0": (out / "demo-Q8_0.gguf").resolve()}
    assert all(p.is_file() for p in exported.gguf.values()) and exported.merged.is_dir()


def test_export_command_prints_the_files_parity_and_warnings(tmp_path, monkeypatch, cli):
    import yaml

    from finetune.console import duration
    from finetune.run import artifacts

    recipe, upstream, _ = _fake_export(tmp_path, monkeypatch)
    monkeypatch.setattr(artifacts, "for_stage", lambda *a, **k: upstream)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "demo", "runs_dir": str(tmp_path / "runs"),
                                    "export": {"quantizations": ["Q8_0"]}}))
    code, out, _ = cli("export", str(path))
    folder = recipe.run_dir("export")
    assert code == 0
    assert f"\nexported to {folder} in {duration(2.5)}\n" in out
    assert "demo-F16.gguf" in out and "demo-Q8_0.gguf" in out and "LoRA adapter" not in out
    assert f"parity: tokenization exact: True, chat prompt exact: True  ({folder / 'parity.json'})\n" in out
    assert out.endswith("warning: a warning\n")
