"""`finetune run`: which stages run and which are skipped. The stages here are small real modules that write
their manifests with runs.StageRun, like the real ones, so the skip logic is exercised on real manifests."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from finetune import pipeline, recipe

STAGE_MODULE = textwrap.dedent('''
    import json
    from finetune import runs

    def run(recipe):
        out = recipe.run_dir("{name}")
        with runs.StageRun(recipe, "{name}") as stage:
            count = out / "count.txt"
            n = int(count.read_text()) + 1 if count.exists() else 1
            count.write_text(str(n))
            stage.outputs = {{"count": n}}
        return {{"count": n}}
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Four toy stages with the real dependency shape, and a recipe whose run folder is in tmp_path."""
    pkg = tmp_path / "toystages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("prepare", "train", "eval", "export"):
        (pkg / f"{name}.py").write_text(STAGE_MODULE.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = tuple(pipeline.Stage(s.name, f"toystages.{s.name}", s.sections, s.upstream) for s in pipeline.STAGES)
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "r.yaml").write_text(f"name: toy\nruns_dir: {tmp_path / 'runs'}\ndata:\n  sources:\n    - path: data.jsonl\n")

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
    assert set(state) == {"prepare", "train", "eval", "export"} and "files" in state["prepare"]


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
    assert pipeline.changed_keys({"lr": 1, "lora": {"r": 8, "alpha": 16}}, {"lr": 1, "lora": {"r": 16, "alpha": 16}},
                                 "train") == ["train.lora.r"]
    assert pipeline.changed_keys(1, 1, "seed") == []


def test_run_command_is_registered(cli):
    code, out, _ = cli("--help")
    assert code == 0 and all(f"  {c} " in out for c in ("run", "serve", "chat", "feedback"))
