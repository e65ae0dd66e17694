"""The Hugging Face Hub, for uploads: ``finetune push RECIPE --repo USER/NAME`` builds an upload plan from what train
and export wrote (``plan``) and sends it as one commit (``push``). Every Hub call of the push, and the ways it fails
(no token, offline, the Hub unreachable, a refused token, no write access), live here; each failure is one line.

What goes where (``--what``):
  adapter  train's adapter/ folder (its model card as README.md) at the repo's root
  merged   export's merged/ checkpoint (its card) at the root
  gguf     export's GGUF files, the LoRA adapter GGUF, Modelfiles, parity.json, quantization.json/.png and the
           export card (with eval's scores when eval has run) at the root; the base model's own F16 GGUF and the
           importance matrix stay home
  all      adapter/ and merged/ as folders, the gguf files at the root
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.run import artifacts

WHAT = ("adapter", "merged", "gguf", "all")
LOGIN_HINT = "run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"


@dataclass(frozen=True)
class Upload:
    path_in_repo: str
    source: Path | bytes      # a file, or generated content (the export card with eval's scores)

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def check_repo_id(repo: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo or ""):
        raise UserError(f"--repo: {repo!r} is not a Hub repository id; give USER/NAME (or ORG/NAME), e.g. "
                        "--repo alice/tickets-smollm2")
    return repo


def plan(recipe, what: str, recipe_path: str = "RECIPE") -> list[Upload]:
    """The files ``finetune push --what WHAT`` uploads, each with its path in the repository."""
    if what not in WHAT:
        raise UserError(f"--what: {what!r} is not one of {', '.join(WHAT)}")
    uploads: list[Upload] = []
    if what in ("adapter", "all"):
        trained = artifacts.load(recipe, artifacts.Trained, recipe_path, fresh=False)
        if trained.adapter is None:
            raise UserError(f"--what adapter: run '{recipe.name}' is full fine-tuning (train.method: full) and has no "
                            "adapter; push --what merged or --what gguf")
        uploads += _folder(trained.adapter, "adapter/" if what == "all" else "")
    if what in ("merged", "gguf", "all"):
        exported = artifacts.load(recipe, artifacts.Exported, recipe_path, fresh=False)
        if what in ("merged", "all"):
            uploads += _folder(exported.merged, "merged/" if what == "all" else "")
        if what in ("gguf", "all"):
            uploads += _export_files(recipe, exported, recipe_path)
    return uploads


def _folder(folder: Path, prefix: str) -> list[Upload]:
    if not folder.is_dir():
        raise UserError(f"{folder} is missing; run the stage that writes it again")
    return [Upload(prefix + p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]


def _export_files(recipe, exported: artifacts.Exported, recipe_path: str) -> list[Upload]:
    from finetune import card

    folder = exported.merged.parent
    files = [*exported.gguf.values(), exported.adapter_gguf, exported.parity, exported.quantization,
             exported.quantization_chart, *sorted(folder.glob("*.Modelfile")), folder / "Modelfile"]
    uploads = [Upload(p.name, p) for p in files if p is not None and p.is_file()]
    missing = [p.name for p in exported.gguf.values() if not p.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)} (listed in {folder}/manifest.json) missing; run `finetune export "
                        f"{recipe_path}` again")
    metrics = _eval_metrics(recipe)
    readme = folder / "README.md"
    if metrics is not None and readme.is_file():
        uploads.append(Upload("README.md", str(card.with_eval(recipe, folder, metrics)).encode()))
    elif readme.is_file():
        uploads.append(Upload("README.md", readme))
    return uploads


def _eval_metrics(recipe) -> dict | None:
    """eval's metrics.json when eval has scored this export (not an earlier one), else None."""
    import json

    evaluated = artifacts.load_if_finished(recipe, artifacts.Evaluated)
    exported = artifacts.load_if_finished(recipe, artifacts.Exported)
    if evaluated is None or exported is None or not evaluated.metrics.is_file():
        return None
    if artifacts.upstream_of(recipe, artifacts.Evaluated, "export") != exported.manifest_id:
        return None
    return json.loads(evaluated.metrics.read_text())


def push(repo: str, uploads: list[Upload], *, private: bool, message: str) -> str:
    """Create the model repository (kept as it is when it exists) and upload ``uploads`` in one commit; returns its
    URL. Failures are UserErrors of one line."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token found: {LOGIN_HINT}, then push again")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=u.path_in_repo,
                                     path_or_fileobj=u.source if isinstance(u.source, bytes) else str(u.source))
                  for u in uploads]
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo, operations=operations, commit_message=message, repo_type="model")
    except OfflineModeIsEnabled:
        raise UserError("the Hub is switched off here (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push, or push "
                        "later from a machine with network") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise UserError(f"the Hub refused the token (401): {LOGIN_HINT} with a token that can write") from None
        if status == 403:
            raise UserError(f"the Hub refused to write to {repo} (403): the token needs write access to that user or "
                            "organisation") from None
        raise UserError(f"the Hub refused the push to {repo} ({status}): {_first_line(exc)}") from None
    except Exception as exc:
        if _unreachable(exc):
            raise UserError(f"cannot reach the Hub ({type(exc).__name__}: {_first_line(exc)}); check the network "
                            "(or HF_ENDPOINT) and push again") from None
        raise
    return str(url)


def _unreachable(exc: BaseException) -> bool:
    """A connection that failed before the Hub answered (refused, timed out, DNS): the HTTP client's transport
    errors, whichever client huggingface_hub uses."""
    names = {c.__name__ for c in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout"})


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
