"""`finetune serve` decisions made before any server starts: the API key a network host needs, and which exported
GGUF a recipe serves. The server itself, spoken to over HTTP, is tests/integration/test_serve_http.py."""

from __future__ import annotations

import pytest

from finetune.run import artifacts


def test_non_loopback_host_needs_an_api_key(cli, gguf, monkeypatch):
    monkeypatch.delenv("FINETUNE_API_KEY", raising=False)
    code, _, err = cli("serve", str(gguf), "--host", "0.0.0.0")
    assert code == 2 and "refusing to listen on 0.0.0.0 without an API key" in err


def test_recipe_target_serves_the_exported_quant(tmp_path, gguf, repo_root):
    from finetune import recipe as recipe_mod
    from finetune.errors import UserError
    from finetune.run.runs import StageRun
    from finetune.serve_target import resolve_target

    recipe_path = str(repo_root / "recipes" / "quickstart.yaml")
    overrides = [f"runs_dir={tmp_path}"]
    with pytest.raises(UserError, match="finetune export"):
        resolve_target(recipe_path, overrides)
    r = recipe_mod.load(recipe_path, overrides)
    exported = tmp_path / "quickstart-Q4_K_M.gguf"
    exported.symlink_to(gguf)
    with StageRun(r, "export") as stage:
        stage.record(artifacts.Exported(merged=tmp_path / "merged", gguf={"Q4_K_M": exported}))
    with pytest.raises(UserError, match=r"no Q8_0 GGUF \(it has: Q4_K_M\)"):
        resolve_target(recipe_path, overrides + ["serve.quant=Q8_0"])
    target = resolve_target(recipe_path, overrides)  # serve.quant left at its default: the type export wrote
    assert target.gguf == exported.resolve() and target.name == "quickstart-Q4_K_M"
    assert target.store_dir == tmp_path / "quickstart" / "serve"
