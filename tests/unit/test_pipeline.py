"""`finetune run`: which stages run and which are skipped. The stages here are small real modules that write
their manifests with runs.StageRun and record what they read, like the real ones (prepare records the real
fingerprint of the data files and the tokenizer), so the skip logic is exercised on real manifests."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

from finetune import recipe
from finetune.errors import UserError
from finetune.run import freshness, pipeline

STAGE_MODULE = textwrap.dedent('''
    import dataclasses, typing
    from pathlib import Path
    from finetune.run import artifacts, runs

    def run(recipe, upstream=None, recipe_path="RECIPE"):
        upstream = upstream if upstream is not None else artifacts.for_stage(recipe, "{name}", recipe_path)
        out = recipe.run_dir("{name}")
        inputs = {{}}
        if "{name}" == "prepare":
            from finetune import models, prepare_inputs
            inputs = prepare_inputs.fingerprint_inputs(recipe, models.resolve(recipe.model.id).path)
        with runs.StageRun(recipe, "{name}", inputs=inputs, upstream=upstream.ids(), aside=True) as stage:
            count = out / "count.txt"
            n = int(count.read_text()) + 1 if count.exists() else 1
            (stage.work / "count.txt").write_text(str(n))
            stage.record(record(artifacts.RECORDS["{name}"], count))
        return {{"count": n}}

    def record(cls, path):
        """A record of the stage's real type whose every path is the count file."""
        hints = typing.get_type_hints(cls)
        values = {{}}
        for f in dataclasses.fields(cls):
            if f.name == "manifest_id":
                continue
            hint = hints[f.name]
            values[f.name] = ({{s: path for s in artifacts.SPLITS}} if hint == dict[str, Path] else path
                              if hint in (Path, Path | None) else {{}} if "dict" in str(hint)
                              else [] if "list" in str(hint) else 0 if hint in (int, float) else "x")
        return cls(**values)
''')


@pytest.fixture
def toy(tmp_path, monkeypatch, tokenizer_dir):
    """Four toy stages with the real dependency shape, and a recipe whose run folder is in tmp_path."""
    pkg = tmp_path / "toystages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for s in pipeline.STAGES:
        (pkg / f"{s.name}.py").write_text(STAGE_MODULE.format(name=s.name, upstream=s.upstream))
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = tuple(pipeline.Stage(s.name, f"toystages.{s.name}", s.sections, s.upstream) for s in pipeline.STAGES)
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "r.yaml").write_text(f"name: toy\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {tokenizer_dir}\n"
                                     "data:\n  sources:\n    - path: data.jsonl\n")

    def load(*overrides: str):
        return recipe.load(tmp_path / "r.yaml", list(overrides))

    def counts() -> dict[str, int]:
        r = load()
        return {s: int((r.run_dir(s) / "count.txt").read_text()) for s in ("prepare", "train", "eval", "export")}

    def go(*overrides: str, **kw):
        result = pipeline.run(load(*overrides), stages=stages, answer=False, **kw)
        return {name: info["status"] for name, info in result["stages"].items()}

    return load, counts, go, data


def test_second_run_skips_everything(toy):
    load, counts, go, _ = toy
    assert set(go().values()) == {"ran"}
    assert set(go().values()) == {"up to date"}
    assert counts() == {"prepare": 1, "train": 1, "eval": 1, "export": 1}
    state = json.loads((load().run_dir() / "pipeline.json").read_text())
    assert set(state) == {"prepare", "train", "eval", "export"}


def test_a_changed_section_reruns_that_stage_and_what_reads_it(toy):
    _, counts, go, _ = toy
    go()
    assert go("train.lr=1e-3") == {"prepare": "up to date", "train": "ran", "eval": "ran", "export": "ran"}
    assert go("train.lr=1e-3", "eval.max_examples=5") == {
        "prepare": "up to date", "train": "up to date", "eval": "ran", "export": "up to date"}
    # eval scores the exported GGUF: a new export makes eval stale too
    assert go("train.lr=1e-3", "eval.max_examples=5", "export.quantizations=[Q8_0]") == {
        "prepare": "up to date", "train": "up to date", "export": "ran", "eval": "ran"}
    assert counts() == {"prepare": 1, "train": 2, "eval": 4, "export": 3}


def test_changed_data_file_reruns_from_prepare(toy):
    _, counts, go, data = toy
    go()
    data.write_text(data.read_text() * 2)
    assert set(go().values()) == {"ran"}
    assert counts()["prepare"] == 2


def test_a_swapped_data_file_with_an_older_mtime_is_noticed_by_content(toy):
    """`cp -p other.jsonl data.jsonl`: same size, older modification time, other content."""
    load, counts, go, data = toy
    go()
    before = data.stat()
    data.write_text(data.read_text().replace('"yo"', '"ok"'))
    os.utime(data, (before.st_atime - 86400, before.st_mtime - 86400))
    assert data.stat().st_size == before.st_size and data.stat().st_mtime < before.st_mtime
    assert freshness.why_stale(load(), freshness.BY_NAME["prepare"]) == f"the content of data file {data} changed"
    with pytest.raises(UserError, match=r"prepared data is stale because the content of data file .*data\.jsonl "
                                        r"changed: run `finetune prepare R"):
        freshness.require_fresh(load(), "train", "R")
    assert go() == {"prepare": "ran", "train": "ran", "export": "ran", "eval": "ran"}


def test_a_data_override_makes_prepared_data_stale_for_every_later_stage(toy):
    load, counts, go, _ = toy
    go()
    changed = load("data.system_prompt=Be brief.", "data.clean.max_tokens=16")
    for stage in ("train", "export", "eval"):
        with pytest.raises(UserError, match=r"prepared data is stale because data\.clean\.max_tokens, "
                                            r"data\.system_prompt changed: run `finetune prepare"):
            freshness.require_fresh(changed, stage)
    freshness.require_fresh(load(), "eval")  # the recipe as it was: everything is fresh
    # a model change that keeps the tokenizer does not touch prepared data, but makes the trained model stale
    with pytest.raises(UserError, match=r"the trained model is stale because model\.dtype changed: run `finetune "
                                        r"train"):
        freshness.require_fresh(load("model.dtype=float32"), "export")


def test_reading_eval_inputs_checks_each_upstream_stage_once(toy, monkeypatch):
    """eval reads prepare, train and export; prepare's data fingerprints (sha256 of every data file) are computed
    once for the three, not once per record."""
    from finetune import prepare_inputs
    from finetune.run import artifacts

    load, _, go, data = toy
    go()
    calls = []
    real = prepare_inputs.stale_inputs
    monkeypatch.setattr(prepare_inputs, "stale_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    up = artifacts.for_stage(load(), "eval", "R")
    assert up.prepared and up.trained and up.exported and len(calls) == 1
    data.write_text(data.read_text() * 2)  # still refused when stale, once checked
    with pytest.raises(UserError, match="prepared data is stale because the content of data file"):
        artifacts.for_stage(load(), "eval", "R")


def test_a_stage_rerun_by_hand_makes_downstream_stale(toy):
    load, counts, go, _ = toy
    go()
    time.sleep(1.1)  # manifests have one-second timestamps
    import toystages.train

    toystages.train.run(load())  # the user ran `finetune train` by hand
    assert go() == {"prepare": "up to date", "train": "up to date", "eval": "ran", "export": "ran"}
    assert counts() == {"prepare": 1, "train": 2, "eval": 2, "export": 2}


def test_force_and_from(toy):
    _, counts, go, _ = toy
    go()
    assert go(start="export") == {"prepare": "up to date", "train": "up to date", "eval": "ran", "export": "ran"}
    forced = go(force=True)
    assert list(forced) == ["prepare", "train", "export", "eval"] and set(forced.values()) == {"ran"}
    assert counts() == {"prepare": 2, "train": 2, "eval": 3, "export": 3}


def test_changed_keys_names_the_dotted_keys():
    assert freshness.changed_keys({"lr": 1, "lora": {"r": 8, "alpha": 16}}, {"lr": 1, "lora": {"r": 16, "alpha": 16}},
                                 "train") == ["train.lora.r"]
    assert freshness.changed_keys(1, 1, "seed") == []


def test_run_command_is_registered(cli):
    code, out, _ = cli("--help")
    assert code == 0 and all(f"  {c} " in out for c in ("run", "serve", "chat", "feedback"))


@pytest.mark.parametrize(("runs_dir", "serve", "picked", "served"), [
    ("r", {}, None, "Q8_0"),                           # short paths: they are named, first six figures
    ("/a/folder/far/enough/away/that/paths/are/long", {}, "Q4_K_M", "Q4_K_M"),
    ("/a/folder/far/enough/away/that/paths/are/long", {"quant": "F16"}, "Q4_K_M", "F16"),
    ("/a/folder/far/enough/away/that/paths/are/long", {"quant": "auto"}, "Q4_K_M", "Q4_K_M"),
])
def test_the_line_after_export_names_what_export_returned_as_a_dict(runs_dir, serve, picked, served):
    """Export returns its record: `finetune run` names the same figures after it as from the dict it once returned."""
    from pathlib import Path

    from finetune.run import artifacts

    r = recipe.validate_dict({"name": "demo", "runs_dir": runs_dir, "serve": serve})
    out = r.run_dir("export")
    exported = artifacts.Exported(merged=out / "merged", gguf={q: out / f"demo-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M")},
                                  parity=out / "parity.json", quantization=out / "quantization.json", picked=picked,
                                  quantization_chart=out / "quantization.png")
    text = {k: str(v) for k, v in vars(exported).items() if isinstance(v, Path)}
    old = {"merged": text["merged"], "merge": {"n_params": 1}, "gguf": {q: str(p) for q, p in exported.gguf.items()},
           "sizes": {"F16": 3}, "adapter_gguf": None, "base_gguf": None, "parity": text["parity"],
           "parity_summary": {"ok": True}, "warnings": [], "seconds": {"total": 1.0},
           "quantization": text["quantization"], "picked": picked, "quantization_chart": text["quantization_chart"],
           "imatrix": None, "served": served}
    assert pipeline._brief(exported, r) == pipeline._brief(old, r)
    assert served in pipeline._brief(exported, r)
