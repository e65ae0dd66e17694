"""The one way a GGUF's chat prompt is built: used by parity and eval (``finetune.gguf.runtime``) and by the server
and terminal chat (``finetune.gguf.worker``), so the model is scored exactly as it is served.

- The template is the GGUF's own ``tokenizer.chat_template`` (or one the user passes); without one there is no
  chat: llama-cpp-python would silently fall back to the llama-2 format.
- Messages and template variables are prepared as in training (``finetune.data.render``): reasoning in the field
  the template reads, the recipe's thinking switch, tools as the template's ``tools``.
- BOS/EOS texts are the GGUF's special tokens, detokenized with their special text.
- Generation stops on every end-of-generation token of the vocabulary (EOS, EOT, ``<|im_end|>``, ...), not only
  on EOS: a template that ends turns with another token must stop there too.
- The prompt is tokenized with special tokens parsed and no extra BOS when the template wrote one itself.

Only used inside processes that load llama.cpp; importing this module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from finetune.data.render import template_kwargs, template_messages


def vocab_of(llm):
    """The ``llama_vocab`` pointer of a loaded ``llama_cpp.Llama``, through llama.cpp's public C API (not
    llama-cpp-python's private ``_model``)."""
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def end_of_generation_ids(llm) -> list[int]:
    """Every token of the GGUF's vocabulary that llama.cpp treats as the end of generation (the renderer's
    ``stop_ids``: the one list generation stops on)."""
    import llama_cpp

    vocab = vocab_of(llm)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def special_text(llm, token_id: int) -> str:
    if token_id < 0:
        return ""
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")


class ChatRenderer:
    """Chat prompts for one loaded ``llama_cpp.Llama``; ``template=None`` takes the GGUF's own."""

    def __init__(self, llm, *, template: str | None = None, reasoning: str = "auto"):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self.template = template if template is not None else (llm.metadata.get("tokenizer.chat_template") or "")
        self.reasoning = reasoning
        self.bos_text = special_text(llm, llm.token_bos())
        self.eos_text = special_text(llm, llm.token_eos())
        self.stop_ids = end_of_generation_ids(llm)
        self.kwargs = template_kwargs(self.template, reasoning) if self.template else {}
        self.formatter = Jinja2ChatFormatter(template=self.template, eos_token=self.eos_text, bos_token=self.bos_text,
                                             stop_token_ids=self.stop_ids or None) if self.template else None

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> tuple[str, list[str]]:
        """(prompt text, stop strings the template asks for)."""
        if self.formatter is None:
            raise ValueError("this GGUF has no chat template")
        self.formatter.add_generation_prompt = add_generation_prompt
        result = self.formatter(messages=template_messages(messages, self.template, self.reasoning), tools=tools,
                                **self.kwargs)
        stops = [s for s in ([result.stop] if isinstance(result.stop, str) else (result.stop or [])) if s]
        return result.prompt, stops

    def tokenize(self, prompt: str) -> list[int]:
        # The template writes its own BOS when the model wants one: never add a second (llama-cpp-python's own Jinja
        # handler does the same through ``added_special``).
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
