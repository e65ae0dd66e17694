"""The family matrix (scripts/family_matrix.py) over every family, and, per family, that export's parity check fails
loudly on a GGUF whose chat template or end-of-turn differs from the trained model's.

The matrix runs once (a child process, as CI runs it) and keeps its runs; the planted mismatches are copies of each
family's exported F16 GGUF rewritten with llama.cpp's own gguf_new_metadata.py, checked with export's own
``parity.run_checks`` against the merged checkpoint.

CI runs every family (every row of the matrix: 19 on 2026-12-07), two at a time (`--jobs 2`: each family's child
process on one core; 13 minutes on 2 idle cores with the twins cached, 17 minutes beside the other integration tests
with every twin built). FINETUNE_MATRIX_FAMILIES=a,b runs a subset while developing (the tests
of the others are skipped, saying so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import family_matrix  # noqa: E402

_ASKED = os.environ.get("FINETUNE_MATRIX_FAMILIES") or "all"
SELECTED = list(family_matrix.ROWS) if _ASKED == "all" else [f for f in _ASKED.split(",") if f]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    work = tmp_path_factory.mktemp("family-matrix")
    out = work / "matrix.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "family_matrix.py"), "--families", ",".join(SELECTED),
                           "--work", str(work / "runs"), "--json", str(out), "--quiet", "--jobs", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=4 * 3600)
    assert out.exists(), f"the matrix wrote no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc


def _family(matrix, name: str) -> dict:
    if name not in SELECTED:
        pytest.skip(f"{name} is not in FINETUNE_MATRIX_FAMILIES")
    return matrix[0]["families"][name]


@pytest.mark.parametrize("name", family_matrix.ROWS)
def test_family_goes_through_every_stage(matrix, name):
    cells = _family(matrix, name)
    failed = {stage: cell.get("error") for stage, cell in cells.items() if not cell["ok"]}
    assert not failed, f"{name}: {json.dumps(failed, indent=1)[:3000]}"
    assert cells["train"]["loss_last"] < cells["train"]["loss_first"]
    assert cells["export"]["tokenization"] and cells["export"]["chat_prompt"]
    assert cells["export"]["end_of_turn"] == family_matrix.family_of(name).end_of_turn and cells["export"]["stopped"]
    assert cells["serve"]["finish_reason"] == "stop"
    if name == "gpt-oss-experts":  # LoRA on the fused expert tensors: the merge must have changed every one
        experts = cells["export"]["experts"]
        assert experts["tensors"] > 0 and experts["changed"] == experts["tensors"], experts


def test_matrix_exit_code_says_whether_all_passed(matrix):
    results, proc = matrix
    all_ok = all(c["ok"] for cells in results["families"].values() for c in cells.values())
    assert (proc.returncode == 0) == all_ok, proc.stdout[-3000:]
    assert "family" in proc.stdout and "prime" in proc.stdout  # the table was printed


def _rewrite(src: Path, dst: Path, *args: str) -> None:
    from finetune.gguf import sdist

    tree = sdist.llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    subprocess.run([sys.executable, str(tree / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"),
                    str(src), str(dst), "--force", *args], check=True, env=env, capture_output=True)


def _parity(merged: Path, gguf: Path, tmp_path: Path) -> dict:
    """export's parity checks of ``gguf`` against the merged checkpoint (no greedy chat: it is not what is planted)."""
    from transformers import AutoTokenizer

    from finetune.export import _prompt_conversations, _renderable
    from finetune.gguf import parity

    tok = AutoTokenizer.from_pretrained(merged)
    rows = parity.FALLBACK_HELDOUT[:2]
    seqs = parity.heldout_sequences(tok, rows)
    ref = tmp_path / "ref.npy"
    hf = parity.HFReference(merged, tok)
    hf.save_logits(seqs, ref)
    convs = _renderable(tok, _prompt_conversations(rows))  # as export renders them (Gemma 2: no system message)
    return parity.run_checks(model_dir=merged, ggufs={"F16": gguf}, tokenizer=tok, sequences=seqs,
                             conversations=convs, greedy_conversations=[], reference=ref, hf=hf, n_params=10**6,
                             min_top1_unquantized=0.99, unquantized="F16")


@pytest.mark.parametrize("name", family_matrix.ROWS)
def test_planted_template_and_end_of_turn_mismatches_fail_parity(matrix, name, tmp_path):
    """One copy of the F16 GGUF with two plants, each of which export's parity check must name on its own: the chat
    template's end of turn swapped for a blank line (a chat that never ends the way the model was trained), and EOS
    moved to an ordinary word (llama.cpp would stop there, and not at the end of turn). One copy and one parity run
    per family: the checks are independent (the template comparison, the rendered prompt ids, the EOS id)."""
    from transformers import AutoTokenizer

    cells = _family(matrix, name)
    if "gguf" not in cells["export"]:
        pytest.fail(f"{name}: export did not write a GGUF: {cells['export'].get('error')}")
    merged = Path(cells["export"]["gguf"]["F16"]).parent / "merged"
    template = (merged / "chat_template.jinja").read_text(encoding="utf-8")
    eot = family_matrix.family_of(name).end_of_turn
    assert eot in template or "eos_token" in template
    planted = template.replace(eot, "\n\n") if eot in template else template.replace("eos_token", "'\\n\\n'")
    tok = AutoTokenizer.from_pretrained(merged)
    other = tok.convert_ids_to_tokens(tok("hello", add_special_tokens=False)["input_ids"][0])
    bad = tmp_path / "planted.gguf"
    _rewrite(Path(cells["export"]["gguf"]["F16"]), bad, "--chat-template", planted, "--special-token", "eos", other)
    report = _parity(merged, bad, tmp_path)
    assert not report["ok"]
    assert any("chat template differs" in f for f in report["failed"]), report["failed"]
    assert any("EOS id: GGUF" in f for f in report["failed"]), report["failed"]
    # Where prompts end a previous turn (multi-turn), the prompt ids differ too (gpt-oss ends only a final answer
    # with <|return|>, so there only the template comparison sees it).
    if family_matrix.twin_of(name) != "gpt-oss":
        assert any(f.startswith("chat_prompt:") for f in report["failed"]), report["failed"]
