"""Named chat templates for base models (model.chat_template: NAME, finetune.templates).

Every built-in template renders a two-turn conversation (and a tool call, where it has a tool section) with a real
tokenizer that lacks its turn tokens (the embedded model's, chat template removed): the turn tokens are added as
special tokens, prepare's masking trains the replies up to the end-of-turn token, and training learns only the new
embedding rows (tied and untied heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import templates
from finetune.data.render import IGNORE_INDEX, RenderError, render_messages
from finetune.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2? USER-ONE"},
    {"role": "assistant", "content": "It is 4. REPLY-ONE"},
    {"role": "user", "content": "And 3 + 3? USER-TWO"},
    {"role": "assistant", "content": "Six. REPLY-TWO"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [  # Mistral's template wants 9-character call ids
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "-3 C, snow", "name": "get_weather", "tool_call_id": "call00001"},
    {"role": "assistant", "content": "It is -3 C and snowing in Oslo."},
]


@pytest.fixture(scope="module")
def base_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """The embedded model's tokenizer files with the chat template removed (a base model's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    out = tmp_path_factory.mktemp("base-tokenizer")
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


_LOADED: dict[tuple[Path, str | None], object] = {}


def _load(folder: Path, name: str | None, *, fresh: bool = False):
    """The tokenizer in ``folder`` as every stage loads it with model.chat_template ``name`` (loaded once per test
    module unless ``fresh``: a 49k vocabulary takes a second or more to load on a busy machine)."""
    from finetune import models

    if fresh or (folder, name) not in _LOADED:
        _LOADED[(folder, name)] = models.load_tokenizer(folder, chat_template=templates.path(name) if name else None)
    return _LOADED[(folder, name)]


def test_every_name_has_its_file_and_its_notice_row():
    notice = (templates.FOLDER / "NOTICE.md").read_text()
    for name in templates.NAMES:
        text = templates.path(name).read_text()
        assert "messages" in text
        assert f"| {name} | {name}.jinja |" in notice
        for token in templates.TEMPLATES[name].turn_tokens:
            assert token in text, (name, token)
        assert templates.TEMPLATES[name].tools == ("tools" in text), name
    assert set(templates.NAMES) >= {"chatml", "llama3", "gemma", "gemma4", "qwen2.5", "qwen3", "mistral", "phi3",
                                    "phi4", "granite"}


@pytest.mark.parametrize("name", templates.NAMES)
def test_each_name_renders_two_turns_with_added_turn_tokens(base_tokenizer_dir, name):
    from finetune import models

    base = _load(base_tokenizer_dir, None)
    tok = _load(base_tokenizer_dir, name)
    template = templates.TEMPLATES[name]
    assert not templates.missing_tokens(tok, template)
    added = templates.new_token_ids(tok, base)
    assert sorted(tok.convert_tokens_to_ids(templates.missing_tokens(base, template))) == added
    assert all(i >= len(base) for i in added)  # appended after the base vocabulary, in the same order every time
    if name == "gemma":  # loaded again from the same files, the same ids
        assert templates.new_token_ids(_load(base_tokenizer_dir, name, fresh=True), base) == added

    ids, labels = render_messages(tok, CONVERSATION)
    for token in template.turn_tokens:
        if token in tok.decode(ids):
            assert tok.convert_tokens_to_ids(token) in ids, token  # one token, never split into pieces
    eot = models.end_of_turn_ids(tok)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert "REPLY-ONE" in trained and "REPLY-TWO" in trained
    assert "USER-ONE" not in trained and "USER-TWO" not in trained
    assert eot[0] in [lab for lab in labels if lab != IGNORE_INDEX]  # the reply is trained to stop
    # The generation prompt (what serving sends) opens the assistant turn with the template's own tokens only.
    prompt = tok(tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt).count("USER-ONE") == 1
    assert set(tok.convert_ids_to_tokens(prompt)) & set(template.turn_tokens)


@pytest.mark.parametrize("name", [n for n, t in templates.TEMPLATES.items() if t.tools])
def test_tool_templates_render_the_call_and_train_it(base_tokenizer_dir, name):
    tok = _load(base_tokenizer_dir, name)
    ids, labels = render_messages(tok, TOOL_CONVERSATION, tools=TOOLS)
    text = tok.decode(ids)
    assert "get_weather" in text and "Oslo" in text
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert "get_weather" in trained and "snowing" in trained


def test_no_template_error_names_the_option_and_the_names(base_tokenizer_dir):
    with pytest.raises(RenderError) as err:
        render_messages(_load(base_tokenizer_dir, None), CONVERSATION)
    assert "model.chat_template" in str(err.value) and "gemma" in str(err.value) and "chatml" in str(err.value)


def test_tool_rows_refusal_names_the_option(base_tokenizer_dir):
    with pytest.raises(RenderError) as err:
        render_messages(_load(base_tokenizer_dir, "chatml"), TOOL_CONVERSATION, tools=TOOLS)
    message = str(err.value)
    assert "model.chat_template" in message and "qwen2.5" in message and "chatml," not in message


def test_fitting_prefers_a_template_whose_tokens_exist_then_the_family(base_tokenizer_dir):
    tok = _load(base_tokenizer_dir, None)  # SmolLM2's vocabulary holds <|im_start|> and <|im_end|>
    assert tok.chat_template is None
    assert templates.fitting(tok) == ("chatml", [])
    assert templates.fitting(tok, "qwen2") == ("qwen2.5", [])  # the family's own, its tokens present
    assert templates.fitting(tok, "gemma3_text") == ("chatml", [])  # no new rows beats the family's name
    lacking = _load(base_tokenizer_dir, None, fresh=True)
    lacking.get_vocab = lambda: {}  # a vocabulary without any template's turn tokens
    assert templates.fitting(lacking, "gemma3_text") == ("gemma", ["<start_of_turn>", "<end_of_turn>"])
    assert templates.fitting(lacking) == ("chatml", ["<|im_start|>", "<|im_end|>"])


def test_recipe_takes_a_name_or_a_jinja_file_and_refuses_anything_else(tmp_path):
    from finetune import recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel:\n  chat_template: gemma\n")
    assert recipe.load(path).chat_template_path() == templates.path("gemma")
    path.write_text("name: t\nmodel:\n  chat_template: mine.jinja\n")
    assert recipe.load(path).chat_template_path() == (tmp_path / "mine.jinja").resolve()
    path.write_text("name: t\nmodel:\n  chat_template: gemma3\n")
    with pytest.raises(recipe.RecipeError) as err:
        recipe.load(path)
    assert "model.chat_template" in str(err.value) and "did you mean 'gemma'" in str(err.value)


def test_a_jinja_file_adds_no_tokens(base_tokenizer_dir, tmp_path):
    from finetune import models

    own = tmp_path / "gemma.jinja"  # the same text, but the user's file: it must use the model's own tokens
    own.write_text(templates.path("gemma").read_text())
    assert templates.builtin_of(own) is None
    tok = models.load_tokenizer(base_tokenizer_dir, chat_template=own)
    assert "<start_of_turn>" not in tok.get_vocab()
    with pytest.raises(UserError):
        models.end_of_turn_ids(tok)  # the turn ends in text, refused with the usual message


@pytest.mark.parametrize("tied", [True, False])
def test_training_learns_only_the_new_token_rows(base_tokenizer_dir, tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.recipe import TrainConfig
    from finetune.training import model_setup

    base = _load(base_tokenizer_dir, None)
    tok = _load(base_tokenizer_dir, "gemma")
    new = templates.new_token_ids(tok, base)
    config = LlamaConfig(vocab_size=len(base), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model_setup.grow_embeddings(model, max(new) + 1)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    peft_model = model_setup._add_adapter(model, TrainConfig(method="lora"), new)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable and all("trainable_tokens" in n for n in trainable)
    ids, labels = render_messages(tok, CONVERSATION)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = peft_model.merge_and_unload()
    after_in, after_out = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    old = torch.arange(after_in.shape[0])[~torch.isin(torch.arange(after_in.shape[0]), torch.tensor(new))]
    assert torch.equal(after_in[old], before_in[old]) and torch.equal(after_out[old], before_out[old])
    assert not torch.equal(after_in[new], before_in[new])
    assert not torch.equal(after_out[new], before_out[new])  # an untied head learns to write them too


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, base_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny random Llama with the template-less tokenizer: a base model."""
    import shutil

    folder = tmp_path_factory.mktemp("base-model")
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    for f in base_tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_prepare_on_a_base_model_says_which_option_to_set(cli, base_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: b\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {base_model_dir}\n"
                      "data:\n  sources:\n    - path: chat.jsonl\n")
    code, _, err = cli("prepare", str(recipe))
    assert code == 2 and "Traceback" not in err
    assert "set model.chat_template to a built-in template name (chatml, llama3, gemma" in err
    assert "(6 rows, e.g. chat.jsonl:1)" in err


def test_doctor_names_the_template_that_fits(base_model_dir):
    from finetune import doctor

    folder = base_model_dir
    report = doctor.examine(str(folder))
    assert any("model.chat_template: chatml" in r for r in report.refusals), report.refusals
    report = doctor.examine(str(folder), chat_template=templates.path("gemma"))
    finding = next(f for stage, check, f in report.rows if check == "chat template")
    assert "model.chat_template gemma" in finding and "<start_of_turn>" in finding
    assert not any("chat template" in r for r in report.refusals)


def test_ollama_modelfile_translates_phi4_and_chatml():
    from finetune.gguf import ollama

    assert ollama.translate_template(templates.path("phi4").read_text()).family == "phi4"
    assert ollama.translate_template(templates.path("chatml").read_text()).family == "chatml"
    assert ollama.translate_template(templates.path("gemma").read_text()).family == "gemma"
