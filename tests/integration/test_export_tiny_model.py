"""export end to end on a tiny model: merge, llama.cpp conversion, quantization, adapter GGUF, parity, Modelfiles.

The tiny model (2 layers, width 64, the embedded model's real tokenizer and ChatML template) is first trained
for a few seconds to answer a handful of conversations and stop, so its logits are peaked (top-1 agreement is
meaningful) and greedy chat ends with <|im_end|>. The LoRA adapter is then trained to change one answer (to tokens the base already emits: a tiny model
cannot learn to emit a token whose tied embedding it never trained).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.run import artifacts

SYSTEM = {"role": "system", "content": "Be brief."}  # short: the template's default system prompt is long
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [SYSTEM, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [SYSTEM, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [SYSTEM, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
]
LORA_CHANGE = [SYSTEM, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "4"}]


def _train(model, tokenizer, conversations, steps: int, lr: float) -> None:
    """Full-batch AdamW until the conversations are memorised (a few seconds for this model)."""
    import torch

    rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only wait for each other
    try:
        model.train()
        for _ in range(steps):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A recipe whose train stage finished with a LoRA adapter over a trained tiny base, plus a prepare test split."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import recipe as recipe_mod
    from finetune.run import runs

    root = tmp_path_factory.mktemp("export-run")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _train(base, tok, CONVERSATIONS, steps=100, lr=3e-3)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _train(peft_model, tok, [LORA_CHANGE, *CONVERSATIONS[:2], CONVERSATIONS[3]], steps=100, lr=5e-3)

    recipe = recipe_mod.validate_dict({"name": "tiny", "runs_dir": str(root / "runs"), "model": {"id": str(base_dir)},
                                       "export": {"quantizations": ["Q8_0"]}}, base_dir=root)
    with runs.StageRun(recipe, "prepare") as stage:
        test = stage.dir / "splits" / "test.jsonl"
        test.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": str(i), "messages": c, "origin": f"t.jsonl:{i}"} for i, c in enumerate([LORA_CHANGE, *CONVERSATIONS])]
        test.write_text("".join(json.dumps(r) + "\n" for r in rows))
        stage.record(artifacts.Prepared(splits={"test": test}, tokenized={}, rows={"test": len(rows)},
                                        report=stage.dir / "report.json", lengths_png=stage.dir / "lengths.png"))
    with runs.StageRun(recipe, "train") as stage:
        adapter = stage.dir / "adapter"
        peft_model.save_pretrained(adapter)
        tok.save_pretrained(adapter)
        stage.record(artifacts.Trained(method="lora", adapter=adapter, model=None, base_model=base_dir,
                                       log=stage.dir / "log.jsonl", summary=stage.dir / "summary.json",
                                       tensorboard=stage.dir / "tb"))
    return recipe


@pytest.fixture(scope="module")
def exported(tiny_run):
    from finetune import export

    result = export.run(tiny_run, log=lambda *_: None)
    return tiny_run, result


def test_export_writes_the_contracted_outputs(exported):
    recipe, result = exported
    out = recipe.run_dir("export")
    exported = artifacts.load(recipe, artifacts.Exported)
    assert set(exported.gguf) == {"F16", "Q8_0"}
    for path in [*exported.gguf.values(), exported.adapter_gguf, exported.parity]:
        assert path.is_file() and path.parent == out
    assert exported.gguf["Q8_0"].stat().st_size < exported.gguf["F16"].stat().st_size
    merged = exported.merged
    assert (merged / "model.safetensors").exists() and (merged / "config.json").exists()
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2] or gen["eos_token_id"] == 2  # <|im_end|>, the end-of-turn token
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(merged).chat_template  # the chat template travels with the checkpoint
    # the quantization table: one row per type, answered on the held-out prompts, with parity's figures
    table = json.loads(exported.quantization.read_text())
    rows = {r["type"]: r for r in table["rows"]}
    assert set(rows) == {"F16", "Q8_0"}
    assert rows["F16"]["examples"] == 5 and 0 <= rows["F16"]["exact_match"] <= 1
    assert rows["Q8_0"]["top1_agreement"] == json.loads(exported.parity.read_text())["types"]["Q8_0"][
        "logits"]["top1_agreement"]
    assert rows["Q8_0"]["decode_tokens_per_s"] > 0 and rows["Q8_0"]["bytes"] < rows["F16"]["bytes"]
    assert exported.imatrix is None  # nothing below 8 bits was asked for
    assert "## Which file to use" in (out / "README.md").read_text()


def test_parity_report_is_exact_for_f16(exported):
    recipe, _ = exported
    report = json.loads((recipe.run_dir("export") / "parity.json").read_text())
    assert report["ok"], report["failed"]
    assert report["metadata"]["chat_template_equal"] and report["metadata"]["eos_id"] == 2
    assert report["end_of_turn"]["end_of_turn"] == [{"id": 2, "token": "<|im_end|>"}]
    assert report["tokenization"]["ok"] and report["tokenization"]["cases"] >= 15
    assert report["chat_prompt"]["ok"] and report["chat_prompt"]["double_bos"] == 0
    f16 = report["types"]["F16"]["logits"]
    assert f16["top1_agreement"] >= 0.99 and f16["kl_mean"] < 1e-3 and f16["positions"] > 50
    assert abs(f16["ppl_gguf"] - f16["ppl_reference"]) / f16["ppl_reference"] < 0.01
    assert report["types"]["Q8_0"]["logits"]["kl_mean"] > f16["kl_mean"]  # quantization costs something
    assert report["adapter"]["top1_agreement"] >= 0.97
    assert report["heldout"]["source"] == "test split"
    # The trained tiny model stops by itself, in HF and in llama.cpp.
    assert report["greedy_chat"]["gguf_stopped"] >= 1


def test_adapter_gguf_over_base_answers_like_the_merged_gguf(exported):
    from finetune.gguf import runtime

    recipe, result = exported
    prompt = [LORA_CHANGE[:-1]]
    merged = runtime.chat(result.gguf["F16"], prompt, max_tokens=20)[0]
    with_lora = runtime.chat(result.base_gguf, prompt, max_tokens=20, lora_path=result.adapter_gguf)[0]
    without = runtime.chat(result.base_gguf, prompt, max_tokens=20)[0]
    assert with_lora["text"] == merged["text"] and merged["finish_reason"] == "stop"
    assert merged["text"] == "4" and without["text"] == "Blue."


def test_modelfiles_and_readme(exported):
    recipe, result = exported
    out = recipe.run_dir("export")
    text = (out / "tiny-Q8_0.Modelfile").read_text()
    assert "FROM ./tiny-Q8_0.gguf" in text
    assert "TEMPLATE" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 1024" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text  # the template's default system prompt
    assert (out / "Modelfile").exists() and "FROM ./tiny-" in (out / "Modelfile").read_text()
    readme = (out / "README.md").read_text()
    assert "tiny-F16.gguf" in readme and "ollama create tiny -f Modelfile" in readme and "lora_path" in readme


def _edit_gguf(src: Path, dst: Path, *args: str) -> None:
    """llama.cpp's own gguf_new_metadata.py (from the installed version's source), in a child process."""
    from finetune.gguf import sdist

    tree = sdist.llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    subprocess.run([sys.executable, str(tree / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"),
                    str(src), str(dst), "--force", *args], check=True, env=env, capture_output=True)


def test_runtime_refuses_a_gguf_without_chat_template(exported, tmp_path):
    from finetune.errors import UserError
    from finetune.gguf import runtime

    _, result = exported
    bare = tmp_path / "no-template.gguf"
    _edit_gguf(Path(result.gguf["Q8_0"]), bare, "--remove-metadata", "tokenizer.chat_template")
    with pytest.raises(UserError, match="no chat template"):
        runtime.chat(bare, [[{"role": "user", "content": "Hi"}]], max_tokens=4)


def test_parity_fails_loudly_on_a_planted_wrong_eos(exported, tmp_path):
    from transformers import AutoTokenizer

    from finetune.gguf import parity

    _, result = exported
    wrong = tmp_path / "wrong-eos.gguf"
    _edit_gguf(Path(result.gguf["F16"]), wrong, "--special-token", "eos", "<jupyter_code>")
    tok = AutoTokenizer.from_pretrained(result.merged)
    ref = tmp_path / "ref.npy"
    seqs = parity.heldout_sequences(tok, [{"messages": c} for c in CONVERSATIONS])
    hf = parity.HFReference(result.merged, tok)
    hf.save_logits(seqs, ref)
    report = parity.run_checks(model_dir=result.merged, ggufs={"F16": wrong}, tokenizer=tok, sequences=seqs,
                               conversations=[c[:-1] for c in CONVERSATIONS], greedy_conversations=[], reference=ref,
                               hf=hf, n_params=10**6, min_top1_unquantized=0.99, unquantized="F16")
    assert not report["ok"]
    assert any("EOS id: GGUF" in f and "<jupyter_code>" in f for f in report["failed"]), report["failed"]


def test_export_fails_clearly_on_a_template_whose_turns_never_end(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    from finetune import export
    from finetune.errors import UserError

    adapter = artifacts.from_folder(artifacts.Trained, tiny_run.run_dir("train")).adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    tok = AutoTokenizer.from_pretrained(broken)
    # Turns end with plain text: nothing a model could emit as one token to stop.
    tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    tok.save_pretrained(broken)
    with pytest.raises(UserError, match="not with a special end-of-turn token"):
        export.export_model(name="broken", out_dir=tmp_path / "out", base_dir=Path(tiny_run.model.id),
                            adapter_dir=broken, log=lambda *_: None)
    assert not (tmp_path / "out" / "merged").exists()


def test_export_refuses_a_tokenizer_without_chat_template(tiny_run, tmp_path):
    from finetune import export
    from finetune.errors import UserError

    adapter = artifacts.from_folder(artifacts.Trained, tiny_run.run_dir("train")).adapter
    bare = tmp_path / "adapter"
    shutil.copytree(adapter, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no chat template"):
        export.export_model(name="bare", out_dir=tmp_path / "out", base_dir=Path(tiny_run.model.id),
                            adapter_dir=bare, log=lambda *_: None)
