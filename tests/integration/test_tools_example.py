"""The shipped tool-calling example, for real, through the CLI: `finetune run recipes/tools.yaml` on the embedded model
with a small budget (prepare -> train -> export -> eval with the Qwen2.5 tool template), then the exported GGUF is
served by its recipe and called with the `openai` client and `tools=`: a valid `tool_calls` object must come back
(non-streaming and streaming), with arguments that are a JSON object for a defined function."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.run import artifacts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tools.yaml"
# the quantization table, the forgetting check and the adapter GGUF prove nothing about tool calls (the quickstart's
# end-to-end test runs them). Batch 4 instead of the recipe's 8 reached 0.42 tool-call
# match, but the served model then streamed other arguments ('Olsen') than it answered whole ('Oslo'): batch 8 stays.
BUDGET = ["train.max_steps=16", "train.eval_every=8", "train.save_every=8", "eval.max_examples=12",
          "eval.max_new_tokens=48", "export.table_examples=0", "eval.forgetting=false", "export.adapter_gguf=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, finetune):
    # FINETUNE_E2E_RUNS_DIR reuses a runs folder (stages already up to date are skipped, the checks still run)
    runs_dir = Path(os.environ.get("FINETUNE_E2E_RUNS_DIR") or tmp_path_factory.mktemp("tools-runs"))
    proc = finetune("run", str(RECIPE), f"runs_dir={runs_dir}", *BUDGET, "--no-answer")
    assert proc.returncode == 0, f"finetune run failed:\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return runs_dir / "tools", runs_dir


def _tools() -> list[dict]:
    first = json.loads((REPO / "recipes" / "data" / "tools.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return first["tools"]


def test_the_gguf_carries_the_tool_template_and_eval_scores_calls(run):
    run_dir, _ = run
    template = (REPO / "recipes" / "templates" / "qwen2.5-tools.jinja").read_text(encoding="utf-8")
    adapter = artifacts.from_folder(artifacts.Trained, run_dir / "train").adapter
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == template
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["gguf"]["status"] == "scored", metrics["gguf"]
    for name in ("base", "finetuned", metrics["gguf"]["variant"]):
        model = metrics["models"][name]
        assert model["tool_call_rows"] == 12 and 0 <= model["tool_call_match"] <= 1
    assert metrics["verdict"]["improved"]["metric"] == "tool_call_match"
    # the base model never writes the calls; a short training already does for some
    assert metrics["models"]["finetuned"]["tool_call_match"] > metrics["models"]["base"]["tool_call_match"]
    example = json.loads((run_dir / "eval" / "examples.jsonl").read_text().splitlines()[0])
    assert "<tools>" in example["prompt"] and '"name": "get_weather"' in example["prompt"]


def test_served_gguf_returns_tool_calls_to_the_openai_client(run):
    openai = pytest.importorskip("openai")
    from serve.launch import ServerProcess

    _, runs_dir = run
    tools = _tools()
    names = {t["function"]["name"] for t in tools}
    messages = [{"role": "system", "content": "You are a helpful assistant. Call a tool when it can answer."},
                {"role": "user", "content": "What's the weather in Oslo in fahrenheit?"}]
    with ServerProcess(RECIPE, [f"runs_dir={runs_dir}", "serve.threads=2"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tools-Q8_0", max_tokens=64, temperature=0, messages=messages,
                                           tools=tools)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id and call.function.name in names
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments, dict) and arguments

        chunks = list(client.chat.completions.create(model="tools-Q8_0", max_tokens=64, temperature=0,
                                                     messages=messages, tools=tools, stream=True))
        streamed = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or []) if ch.choices]
        assert [c.function.name for c in streamed] == [call.function.name]
        assert json.loads(streamed[0].function.arguments) == arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
