"""Ollama Modelfiles: the GGUF's Jinja chat template translated to Ollama's Go TEMPLATE.

Ollama does not run Jinja; a Modelfile needs the prompt format written as a Go template. Only formats whose
translation is known exactly are written (ChatML, Llama 3, Gemma, Phi-3); for any other template the Modelfile
says so and Ollama falls back to its own detection from the GGUF metadata - the export reports it as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""

_GEMMA = """{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}<end_of_turn>
{{ end }}{{ end }}<start_of_turn>model
"""

_PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""

# family -> (markers that must all be in the Jinja template, Go template)
_FAMILIES: list[tuple[str, tuple[str, ...], str]] = [
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _LLAMA3),
    ("chatml", ("<|im_start|>", "<|im_end|>"), _CHATML),
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), _GEMMA),
    ("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), _PHI3),
]


@dataclass(frozen=True)
class Translation:
    family: str | None   # None: not translated
    template: str | None
    warning: str | None


def translate_template(jinja_template: str) -> Translation:
    """The Ollama TEMPLATE for a known chat template family, or a warning saying why there is none."""
    for family, markers, go_template in _FAMILIES:
        if all(m in jinja_template for m in markers):
            return Translation(family, go_template, None)
    return Translation(None, None, "the chat template is not a format finetune can translate to Ollama's TEMPLATE "
                                   "(known: ChatML, Llama 3, Gemma, Phi-3); Ollama will guess the format from the "
                                   "GGUF. Check `ollama show --template` and add a TEMPLATE to the Modelfile.")


def modelfile(gguf_name: str, *, jinja_template: str, stop_tokens: list[str], num_ctx: int,
              default_system: str | None = None) -> tuple[str, str | None]:
    """Modelfile text for ``gguf_name`` (a file next to it) and a warning, if the template could not be translated."""
    tr = translate_template(jinja_template)
    lines = [f"# Ollama Modelfile for {gguf_name}. Use: ollama create NAME -f {_self_name(gguf_name)} && ollama run NAME",
             f"FROM ./{gguf_name}", ""]
    if tr.template is not None:
        lines += [f"# Chat format: {tr.family}, translated from the GGUF's Jinja chat template.",
                  f'TEMPLATE """{tr.template}"""', ""]
    else:
        lines += [f"# WARNING: {tr.warning}", ""]
    if default_system:
        lines += ["# The chat template's default system prompt (used when a chat has none).",
                  f'SYSTEM """{default_system}"""', ""]
    for tok in stop_tokens:
        lines.append(f'PARAMETER stop "{_escape(tok)}"')
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n", tr.warning


def _self_name(gguf_name: str) -> str:
    return modelfile_name(gguf_name)


def modelfile_name(gguf_name: str) -> str:
    """quickstart-Q8_0.gguf -> Modelfile.Q8_0 style name: 'quickstart-Q8_0.Modelfile'."""
    return gguf_name.removesuffix(".gguf") + ".Modelfile"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
