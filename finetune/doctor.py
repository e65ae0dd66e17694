"""``finetune doctor MODEL``: before any training, what the toolkit will do with this model, stage by stage.

    finetune doctor Qwen/Qwen3-1.7B          # a Hub id (config and tokenizer files only are fetched)
    finetune doctor ./my-model               # a local Hugging Face folder
    finetune doctor recipes/quickstart.yaml  # the recipe's model.id
    finetune doctor model.gguf               # a GGUF file, from its header (nothing converted)
    finetune doctor --config config.json     # a config.json alone (offline; no tokenizer checks)

It says which family the model is, whether each stage supports it (train: LoRA targets, packing; export:
llama.cpp's converter, multi-token-prediction layers; serve: chat template, end of turn), what its template's
BOS and end-of-turn tokens are, and what will be exported. A model that cannot go all the way is refused here,
with the reason and what to do, exit code 2 - never at export after hours of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.console import count, table
from finetune.errors import UserError

# Files enough to answer every question here: config, tokenizer and template. Never the weights.
_METADATA_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass
class Report:
    model: str
    path: Path
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (stage, check, finding)
    refusals: list[str] = field(default_factory=list)

    def add(self, stage: str, check: str, finding: str) -> None:
        self.rows.append((stage, check, finding))

    def refuse(self, stage: str, check: str, why: str) -> None:
        self.rows.append((stage, check, f"NO: {why}"))
        self.refusals.append(f"{stage}: {why}")


def metadata_folder(model_id: str, revision: str | None = None, *, base_dir: Path | None = None) -> Path:
    """A folder holding the model's config and tokenizer files: local as is, the embedded model converted, or a
    Hub repository's metadata files only (no weights)."""
    from finetune import models

    kind, candidate = models.locate(model_id, base_dir=base_dir)
    if kind == "local":
        if not (candidate / "config.json").is_file():
            raise UserError(f"{candidate} has no config.json; give a Hugging Face model folder")
        return candidate.resolve()  # its config and tokenizer are all this needs: no weights required
    if kind != "hub":  # the embedded model or a GGUF: converted once into a checkpoint folder (cached)
        return models.resolve(model_id, revision, base_dir=base_dir).path
    from huggingface_hub import snapshot_download

    from finetune.console import quiet_hub

    try:
        with quiet_hub():
            return Path(snapshot_download(model_id, revision=revision, allow_patterns=_METADATA_PATTERNS,
                                          local_files_only=models.hub_offline()))
    except Exception as exc:  # noqa: BLE001 - the Hub's errors are many; each becomes one line
        where = "HF_HUB_OFFLINE is set and they are not in the cache" if models.hub_offline() else (
            f"{type(exc).__name__}: {one_line(exc)}")
        raise UserError(f"{model_id}: could not read its config and tokenizer files from the Hub ({where}). Gated "
                        f"models need `hf auth login` and the license accepted. Without the Hub: {config_hint(model_id)}"
                        ) from None


def examine(model_id: str | None, revision: str | None = None, *, base_dir: Path | None = None,
            trust_remote_code: bool = False, adapter_gguf: bool = False, chat_template: Path | None = None,
            config_path: Path | None = None) -> Report:
    """The findings for a model. ``adapter_gguf``: a recipe asks for the LoRA adapter GGUF (refused where llama.cpp
    cannot write one; without a recipe that is a finding, not a refusal). ``chat_template``: the recipe's
    model.chat_template as a file (a built-in name's or a .jinja), checked in place of the model's own.
    ``config_path``: the model's config.json given by hand (``--config``: offline, or a model not at hand); the
    tokenizer is checked only when its files are beside it."""
    from transformers import AutoConfig

    from finetune import image_text, models, refusals

    if config_path is None:
        path = metadata_folder(model_id, revision, base_dir=base_dir)
        config_file, raw = path / "config.json", models.read_config(path)
    else:  # read as `finetune plan --config` reads it
        raw, source = models.load_model_config(model_id or "", config_path=config_path)
        config_file = Path(source)
        path = config_file.parent
    report = Report(model_id or str(config_file), path)
    try:
        config = AutoConfig.from_pretrained(path if config_path is None else config_file,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: not a config transformers can read ({one_line(exc)})") from None
    arch = (raw.get("architectures") or ["?"])[0]
    report.add("model", "architecture", f"{arch} (model_type {raw.get('model_type')})")
    if image_text.is_image_text(raw):
        problem = image_text.text_model_problem(raw)
        if problem:
            report.refuse("train", "image-text checkpoint", problem)
            return report
        report.add("model", "image-text checkpoint", "text-only fine-tuning: the language model's linear layers get "
                   "the adapters, the vision tower and projector are kept byte for byte in the merged checkpoint; "
                   "the GGUF is the text model (no mmproj)")
        if image_text.text_model(raw).from_text_config:  # the text class is built from the language model's config
            config = config.text_config
    layout = refusals.shared_kv_problem(raw)
    if layout:
        report.refuse("export", "shared key/value layers", layout)
    if not _model_findings(report, config, arch, trust_remote_code):
        return report
    if config_path is not None and not (path / "tokenizer_config.json").is_file():
        report.add("prepare", "chat template", "not checked: --config gives the config only (the tokenizer and its "
                   "template come with the model)")
    elif not _template_findings(report, path, trust_remote_code, raw.get("model_type"), chat_template):
        return report
    _export_findings(report, arch, raw, adapter_gguf)
    return report


def _model_findings(report: Report, config: Any, arch: str, trust_remote_code: bool) -> bool:
    """Parameters (total and active per token), what LoRA can reach, whether batches can be packed; False when
    transformers cannot build the model at all (refused)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.training import attention, model_setup

    text = getattr(config, "text_config", None) or config
    try:  # counted on the meta device: no memory, no weights
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        report.refuse("train", "transformers class", f"transformers cannot build {arch} as a causal LM "
                      f"({type(exc).__name__}: {one_line(exc)}); upgrade transformers or pick "
                      "a supported model")
        return False
    total = sum(p.numel() for p in model.parameters())
    experts = int(getattr(text, "num_local_experts", 0) or getattr(text, "num_experts", 0) or 0)
    per_token = int(getattr(text, "num_experts_per_tok", 0) or 0)
    if experts and per_token:
        expert_params = sum(p.numel() for n, p in model.named_parameters() if model_setup.in_experts(n))
        # as model cards (and finetune plan) count it: the routed experts only, without the input embedding lookup
        active = (total - expert_params + expert_params * per_token // experts
                  - model.get_input_embeddings().weight.numel())
        report.add("model", "parameters", f"{count(total)} total, {count(active)} active per token "
                   f"({per_token} of {experts} experts)")
    else:
        report.add("model", "parameters", count(total))
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and not n.endswith("lm_head")})
    if not linear:
        report.refuse("train", "LoRA targets", "no linear layer for LoRA to adapt; use train.method: full")
    else:
        note = ", ".join(linear)
        if experts and model_setup.expert_parameters(model):
            note += (" (the experts and the router are fused weight tensors, not linear layers: LoRA adapts the "
                     "attention projections; train.lora.experts: true adapts the experts too)")
        report.add("train", "LoRA targets (all-linear)", note)
    obstacle = attention.packing_obstacle(config)
    report.add("train", "packed batches", f"off: {obstacle}; padded batches instead" if obstacle else
               "on (padding-free; sliding windows, soft-capping and attention sinks honoured)")
    return True


def _template_findings(report: Report, path: Path, trust_remote_code: bool, model_type: str | None,
                       chat_template: Path | None = None) -> bool:
    """The tokenizer, its chat template (``chat_template``: the recipe's model.chat_template as a file), end of turn
    and BOS; False when the tokenizer does not load (refused)."""
    from finetune import models, templates

    try:
        tok = models.load_tokenizer(path, trust_remote_code=trust_remote_code, chat_template=chat_template)
    except UserError as exc:
        report.refuse("prepare", "chat template", str(exc))
        return False
    except Exception as exc:  # noqa: BLE001
        report.refuse("prepare", "tokenizer", f"the tokenizer does not load ({type(exc).__name__}: "
                      f"{one_line(exc)})")
        return False
    builtin = templates.builtin_of(chat_template)
    if not tok.chat_template:
        name, missing = templates.fitting(tok, model_type)
        adds = (f"adds the turn tokens {', '.join(missing)} and trains their embedding rows" if missing else
                "its turn tokens are already in the vocabulary")
        report.refuse("prepare", "chat template", "the tokenizer has no chat template (a base model?), so "
                      f"conversations cannot be rendered: set model.chat_template: {name} "
                      f"({templates.TEMPLATES[name].family}; {adds}); built-in: {', '.join(templates.NAMES)}; "
                      "or a .jinja file")
    else:
        added = templates.new_token_ids(tok, models.load_tokenizer(path, trust_remote_code=trust_remote_code)
                                        ) if builtin is not None else []
        report.add("prepare", "chat template",
                   (f"model.chat_template {builtin.name}" if builtin else
                    f"model.chat_template {chat_template.name}" if chat_template else "yes")
                   + f" ({len(tok.chat_template)} characters)"
                   + (f"; adds the turn tokens {', '.join(tok.convert_ids_to_tokens(added))} (their embedding rows "
                      "are trained)" if added else ""))
        try:
            eot = models.end_of_turn_ids(tok)
            report.add("serve", "end of turn", ", ".join(repr(tok.convert_ids_to_tokens(i)) for i in eot) +
                       " (becomes the exported EOS, so llama.cpp and Ollama stop there)")
        except UserError as exc:
            report.refuse("serve", "end of turn", str(exc))
    report.add("prepare", "BOS", repr(tok.bos_token) if tok.bos_token else "none")
    return True


def _export_findings(report: Report, arch: str, raw: dict[str, Any], adapter_gguf: bool) -> None:
    """Whether llama.cpp's converter knows the architecture, whether it can write the adapter, what is exported."""
    from finetune.gguf import convert, sdist

    src = sdist.llama_cpp_dir(download=False) if _installed_llama() else None
    if src is None:
        report.add("export", "llama.cpp converter", "unknown: llama-cpp-python's source is not cached yet "
                   "(`make install` fetches it)")
    else:
        known = set(convert._text_model_map(str(src)))
        if arch not in known:
            report.refuse("export", "llama.cpp converter", f"{arch} is not an architecture llama.cpp's converter "
                          f"knows (llama-cpp-python {sdist.installed_version()}); the merged Hugging Face checkpoint "
                          "would be the only output")
        else:
            report.add("export", "llama.cpp converter", f"{arch}: yes")
            adapter_problem = convert.adapter_gguf_problem(arch, download=False)
            if adapter_problem and adapter_gguf:
                report.refuse("export", "LoRA adapter GGUF", f"{adapter_problem}; set export.adapter_gguf: false "
                              "and use the merged GGUFs")
            elif adapter_problem:
                report.add("export", "LoRA adapter GGUF", f"no: {adapter_problem}; export.adapter_gguf must be "
                           "false (the merged GGUFs carry the fine-tune)")
    if any(int(c.get(k) or 0) > 0 for c in (raw, raw.get("text_config") or {})
           for k in ("mtp_num_hidden_layers", "num_nextn_predict_layers")):
        report.add("export", "multi-token prediction", "declared in config.json; transformers does not load those "
                   "layers, so the GGUF is converted without them (--no-mtp)")
    adapter = "" if src is not None and convert.adapter_gguf_problem(arch, download=False) else "LoRA adapter GGUF, "
    report.add("export", "outputs", "merged checkpoint, F16 GGUF + quantized types (importance matrix from your "
               f"data below 8 bits), {adapter}Ollama Modelfile, parity report")


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (no cut: the end of a message is often the part that says why)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def config_hint(model_id: str) -> str:
    """How to go on without the Hub: the bundled config.json snapshot of this model when there is one, else
    --config."""
    from finetune.plan import bundled_config

    snapshot = bundled_config(model_id)
    if snapshot is None:
        return "give its config.json with --config PATH (a file, or a folder that has one)"
    return f"--config {snapshot} (the config.json snapshot shipped with finetune)"


def _installed_llama() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def format_report(report: Report) -> str:
    findings = table(["stage", "check", "finding"], report.rows, title=f"{report.model}  ({report.path})", width=120)
    verdict = ("supported through every stage" if not report.refusals else
               "REFUSED: " + "; ".join(report.refusals))
    return f"{findings}\n{verdict}\n"


def gguf_report(path: Path) -> Report:
    """A GGUF file from its header alone (its metadata and tensor list, finetune.gguf.header; nothing is converted
    or copied): architecture, size, tensor types, context, chat template, end of turn, and what the stages will do
    with it."""
    from collections import Counter

    from gguf import GGMLQuantizationType

    from finetune.console import mib
    from finetune.gguf import header

    try:
        read = header.read(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # a truncated or foreign file, on one line
        raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {one_line(exc)})") from None
    tensors = read.tensors

    def value(key: str) -> Any:
        return read.metadata.get(key)

    def type_name(type_id: int) -> str:
        try:
            return GGMLQuantizationType(type_id).name
        except ValueError:
            return f"type {type_id}"

    arch = value("general.architecture") or "?"
    report = Report(str(value("general.name") or path.name), path)
    report.add("model", "architecture", f"{arch} (GGUF v{read.version}, {mib(path.stat().st_size)})")
    types = Counter(type_name(t.type_id) for t in tensors)
    report.add("model", "parameters", f"{count(sum(t.n_elements for t in tensors))} in "
               f"{len(tensors)} tensors ({', '.join(f'{n} {k}' for k, n in types.most_common())})")
    context = value(f"{arch}.context_length")
    report.add("model", "context", f"{context} tokens" if context else "not stated")
    tokens = value("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = value(key)
        return repr(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else "none"

    template = value("tokenizer.chat_template")
    if template:
        report.add("prepare", "chat template", f"yes ({len(template)} characters)")
    else:
        report.refuse("prepare", "chat template", "the GGUF carries no chat template, so conversations cannot be "
                      "rendered the way the model will be served; set model.chat_template to a .jinja file")
    report.add("prepare", "BOS", token("tokenizer.ggml.bos_token_id"))
    report.add("serve", "end of turn (EOS)", token("tokenizer.ggml.eos_token_id"))
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch.replace("-", "") in {a.replace("-", "") for a in GGUF_SUPPORTED_ARCHITECTURES}:
        report.add("train", "weights", "converted once into a float32 Hugging Face checkpoint in the cache when a "
                   f"stage first loads it (about {mib(4 * sum(t.n_elements for t in tensors))}); the GGUF "
                   "itself is left as it is")
    else:
        report.refuse("train", "weights", f"transformers cannot read a {arch} GGUF back into a checkpoint to train "
                      "(it reads " + ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES)) + "); start from the model's "
                      "Hugging Face repository instead")
    report.add("serve", "as it is", f"finetune serve / finetune chat {path.name} run it directly with llama.cpp")
    return report


def check(model: str | None, *, config: Path | None = None, revision: str | None = None,
          trust_remote_code: bool = False, as_json: bool = False) -> int:
    """Print the findings for ``model`` (a Hub id, a folder, a .gguf file or a recipe: its model.id) or for a
    config.json alone (``config``), as a table or JSON; 2 when a stage refuses it, else 0."""
    if model is None and config is None:
        raise UserError("finetune doctor: give a MODEL (a Hub id, a folder, a .gguf file or a recipe) or "
                        "--config CONFIG.json")
    model_id, base_dir, remote = model, Path.cwd(), trust_remote_code
    adapter_gguf = False
    if model_id and model_id.endswith((".yaml", ".yml")):
        from finetune import recipe

        r = recipe.load(model_id)
        model_id, revision, base_dir = r.model.id, revision or r.model.revision, r.base_dir
        remote = remote or r.model.trust_remote_code
        adapter_gguf = r.export.adapter_gguf and r.train.method in ("lora", "qlora")
    if model_id and config is None and Path(model_id).suffix.lower() == ".gguf":
        from finetune import models

        report = gguf_report(models.locate(model_id, base_dir=base_dir)[1])
    else:
        report = examine(model_id, revision, base_dir=base_dir, trust_remote_code=remote, adapter_gguf=adapter_gguf,
                         config_path=config)
    if as_json:
        print(json.dumps({"model": report.model, "path": str(report.path),
                          "findings": [dict(zip(("stage", "check", "finding"), r, strict=True)) for r in report.rows],
                          "refused": report.refusals}, indent=1))
    else:
        print(format_report(report), end="")
    return 2 if report.refusals else 0
