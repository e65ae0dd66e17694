"""One GGUF chat renderer: eval/parity (finetune.gguf.runtime, a child process) and the server (finetune.gguf.worker) build
byte-identical prompts, token ids and stop tokens from the same conversations."""

from __future__ import annotations

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass? 🌱 草"}],
]


def test_eval_and_serve_render_the_same_prompt_and_stop_tokens(gguf):
    from finetune.gguf import runtime
    from finetune.gguf.worker import Generator

    info, rendered = (r["result"] for r in runtime.run_many(gguf, [("inspect", {}),
                                                                    ("render_chat", {"conversations": CONVERSATIONS})]))
    generator = Generator(str(gguf), n_ctx=512, threads=1)
    for conversation, eval_side in zip(CONVERSATIONS, rendered, strict=True):
        prompt, _ = generator.render_chat(conversation)
        assert prompt == eval_side["text"]
        assert generator.tokenize_prompt(prompt, chat=True) == eval_side["ids"]
        bos = generator.llm.token_bos()
        assert eval_side["ids"][:2] != [bos, bos]  # never a doubled BOS
    assert generator.renderer.stop_ids == info["eog_ids"]
    assert generator.llm.token_eos() in generator.renderer.stop_ids


def test_answers_match_between_eval_and_serve(gguf):
    """Greedy answers through both paths are the same text (the same prompt, the same stop tokens)."""
    from finetune.gguf import runtime
    from finetune.gguf.worker import Generator

    eval_side = runtime.chat(gguf, CONVERSATIONS[:1], max_tokens=24)[0]
    generator = Generator(str(gguf), n_ctx=512, threads=2)
    prompt, stops = generator.render_chat(CONVERSATIONS[0])
    out = generator.llm.create_completion(generator.tokenize_prompt(prompt, chat=True), max_tokens=24, temperature=0.0,
                                          repeat_penalty=1.0, top_k=0, stop=stops or None)
    assert out["choices"][0]["text"] == eval_side["text"]
    assert out["choices"][0]["finish_reason"] == eval_side["finish_reason"]
