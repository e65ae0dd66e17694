"""What ``finetune serve`` and ``finetune chat`` run: the GGUF of a recipe's export (or a .gguf file), its serve
settings, where its conversations and feedback are stored, and the options of the llama.cpp worker that runs it.

Shared by the server (serve/server.py) and the terminal chat, which needs no server package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import Recipe, ServeConfig


@dataclass
class Target:
    gguf: Path
    name: str                 # the model name the API reports
    config: ServeConfig
    store_dir: Path
    recipe: Recipe | None     # None when serving a bare .gguf
    recipe_path: str | None


def resolve_target(target: str, overrides: list[str] | None = None) -> Target:
    """A recipe (its exported GGUF) or a .gguf file -> what to serve, with which settings, storing where."""
    from finetune import recipe as recipe_mod
    from finetune.feedback_store import gguf_store_dir
    from finetune.gguf import runtime
    from finetune.run import artifacts

    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        runtime.check_gguf(path)
        # Only serve.* overrides make sense without a recipe; they go through the same validation.
        bad = [o for o in overrides or [] if not o.startswith("serve.")]
        if bad:
            raise UserError(f"with a .gguf file only serve.* overrides apply (e.g. serve.n_ctx=4096), got: {bad}")
        data = recipe_mod.apply_overrides({"name": "serve"}, overrides or [])
        config = recipe_mod.validate_dict(data, source="overrides").serve
        return Target(path.resolve(), path.stem, config, gguf_store_dir(path), None, None)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{target}: give a recipe (.yaml) or a model file (.gguf)")
    recipe = recipe_mod.load(path, overrides)
    exported = artifacts.load(recipe, artifacts.Exported, str(path), fresh=False)  # a stale export still serves
    ggufs = exported.gguf
    try:  # the rule the export's Modelfile and eval follow too
        quant = exported.gguf_to_serve(artifacts.requested(recipe.serve, "quant"))
    except UserError as exc:
        raise UserError(f"serve.quant: {exc} (run '{recipe.name}'; e.g. `finetune serve {target} "
                        f"serve.quant={next(iter(ggufs), 'F16')}`)") from None
    gguf = ggufs[quant]
    if not gguf.is_file():
        raise UserError(f"{gguf} (listed in {recipe.run_dir('export')}/manifest.json) is missing; run "
                        f"`finetune export {target}` again")
    runtime.check_gguf(gguf, what=f"serve.quant {quant}")
    return Target(gguf.resolve(), f"{recipe.name}-{quant}", recipe.serve, recipe.run_dir("serve"), recipe, str(path))


def worker_options(target: Target, *, threads: int | None = None) -> dict:
    config = target.config
    chat_template = None
    if config.chat_template:
        base = target.recipe.base_dir if target.recipe else Path.cwd()
        template_path = Path(config.chat_template)
        template_path = template_path if template_path.is_absolute() else base / template_path
        if not template_path.is_file():
            raise UserError(f"serve.chat_template: {template_path} not found")
        chat_template = template_path.read_text(encoding="utf-8")
    return {"gguf": str(target.gguf), "n_ctx": config.n_ctx, "chat_template": chat_template,
            # the worker takes its share of the cores, capped (finetune.gguf.worker.llama_threads)
            "threads": threads or config.threads, "sharing": config.workers,
            # trained and served the same way: the recipe's reasoning setting (a bare .gguf: the template's default)
            "reasoning": target.recipe.data.reasoning if target.recipe else "auto"}
