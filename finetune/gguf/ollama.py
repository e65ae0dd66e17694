"""Ollama Modelfiles: the GGUF's Jinja chat template translated to Ollama's Go TEMPLATE.

Ollama does not run Jinja; a Modelfile needs the prompt format written as a Go template. Only formats whose
translation is known exactly are written (ChatML, Llama 3, Gemma 2/3, Gemma 4, Phi-3, Phi-4, Mistral v0.3/Nemo,
Mistral 3, Granite 4, gpt-oss harmony); for any other template the Modelfile
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

_GEMMA4 = """{{- if .System }}<|turn>system
{{ .System }}<turn|>
{{ end }}{{- range .Messages }}<|turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}
{{ .Content }}<turn|>
{{ end }}<|turn>model
<|channel>thought
<channel|>"""

# Mistral v0.3 / Nemo: the system prompt goes before the last user message.
_MISTRAL = """{{- range $i, $m := .Messages }}{{- if eq $m.Role "user" }}[INST]{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}

{{ end }}{{ $m.Content }}[/INST]{{ else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}{{ end }}"""

_MISTRAL3 = """{{- if .System }}[SYSTEM_PROMPT]{{ .System }}[/SYSTEM_PROMPT]{{ end }}{{- range .Messages }}
{{- if eq .Role "user" }}[INST]{{ .Content }}[/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""

_GRANITE = """{{- if .System }}<|start_of_role|>system<|end_of_role|>{{ .System }}<|end_of_text|>
{{ end }}{{- range .Messages }}<|start_of_role|>{{ .Role }}<|end_of_role|>{{ .Content }}<|end_of_text|>
{{ end }}<|start_of_role|>assistant<|end_of_role|>"""

_HARMONY = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ currentDate }}

Reasoning: medium

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{{- if .System }}<|start|>developer<|message|># Instructions

{{ .System }}

<|end|>{{ end }}{{- range .Messages }}{{- if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>
{{- else if eq .Role "assistant" }}<|start|>assistant<|channel|>final<|message|>{{ .Content }}<|end|>{{ end }}{{ end }}<|start|>assistant"""

# Phi-4 (14B): ChatML's turn tokens with <|im_sep|> after the role instead of a newline.
_PHI4 = """{{- if .System }}<|im_start|>system<|im_sep|>{{ .System }}<|im_end|>{{ end }}
{{- range .Messages }}{{- if eq .Role "user" }}<|im_start|>user<|im_sep|>{{ .Content }}<|im_end|>
{{- else if eq .Role "assistant" }}<|im_start|>assistant<|im_sep|>{{ .Content }}<|im_end|>{{ end }}{{ end }}<|im_start|>assistant<|im_sep|>"""

# family -> (markers that must all be in the Jinja template, Go template); the first match wins.
_FAMILIES: list[tuple[str, tuple[str, ...], str]] = [
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _LLAMA3),
    ("phi4", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), _PHI4),
    ("chatml", ("<|im_start|>", "<|im_end|>"), _CHATML),
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), _GEMMA),
    ("gemma4", ("<|turn>", "<turn|>"), _GEMMA4),
    ("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), _PHI3),
    ("mistral3", ("[SYSTEM_PROMPT]", "[INST]", "[/INST]"), _MISTRAL3),
    ("mistral", ("[INST]", "[/INST]"), _MISTRAL),
    ("granite", ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"), _GRANITE),
    ("harmony", ("<|start|>", "<|message|>", "<|channel|>", "<|end|>"), _HARMONY),
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
                                   "(known: ChatML, Llama 3, Gemma, Gemma 4, Phi-3, Mistral, Mistral 3, Granite, "
                                   "harmony); Ollama will guess the format from the GGUF. Check `ollama show --template` and add a TEMPLATE to the Modelfile.")


def context_length(trained_tokens: int | None, model_context: int | None) -> int:
    """The Modelfile's num_ctx: the training sequence length rounded up to a power of two, at least 2048 (a chat
    runs longer than one training row: a few turns and the answer; 2048 is Ollama's long-standing default), at most
    the model's own context and 32768 (Ollama allocates the whole window up front)."""
    wanted = 2048
    while wanted < (trained_tokens or 0):
        wanted *= 2
    return min(wanted, model_context or wanted, 32768)


def modelfile(gguf_name: str, *, jinja_template: str, stop_tokens: list[str], num_ctx: int,
              default_system: str | None = None, trained_system: bool = False) -> tuple[str, str | None]:
    """Modelfile text for ``gguf_name`` (a file next to it) and a warning, if the template could not be translated.
    ``trained_system``: ``default_system`` is the system prompt of the training data, not the template's default."""
    tr = translate_template(jinja_template)
    lines = [f"# Ollama Modelfile for {gguf_name}. Use: ollama create NAME -f {_self_name(gguf_name)} && ollama run NAME",
             f"FROM ./{gguf_name}", ""]
    if tr.template is not None:
        lines += [f"# Chat format: {tr.family}, translated from the GGUF's Jinja chat template.",
                  f'TEMPLATE """{tr.template}"""', ""]
    else:
        lines += [f"# WARNING: {tr.warning}", ""]
    if default_system:
        lines += ["# The system prompt the model was trained with (used when a chat has none)." if trained_system
                  else "# The chat template's default system prompt (used when a chat has none).",
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
