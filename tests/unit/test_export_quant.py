"""The quantization table's pick: the smallest type within the size budget and the exact-match tolerance. The
importance matrix, collected and used by llama.cpp's quantizer: tests/integration/test_export_imatrix.py."""

from __future__ import annotations

from finetune.gguf import quant_table


def _row(qtype, mib, em):
    return {"type": qtype, "bytes": int(mib * 2**20), "exact_match": em, "examples": 50, "imatrix": False}


def test_pick_is_the_smallest_type_within_budget_and_tolerance():
    rows = [_row("F16", 260, 0.98), _row("Q8_0", 140, 0.98), _row("Q4_K_M", 100, 0.96), _row("Q4_0", 85, 0.80)]
    picked, why = quant_table.pick(rows, fit_bytes=int(0.2e9), tolerance=0.02)
    assert picked == "Q4_K_M" and "0.96" in why
    assert quant_table.pick(rows, fit_bytes=int(0.1e9), tolerance=0.02)[0] is None  # only Q4_0 fits: too lossy
    assert quant_table.pick(rows, fit_bytes=int(0.1e9), tolerance=0.2)[0] == "Q4_0"
    none, why = quant_table.pick(rows, fit_bytes=int(0.05e9), tolerance=0.02)
    assert none is None and "fits" in why


def test_the_readme_table_and_the_report_format_measures_alike():
    """One formatter for a measured figure: the README's markdown writes a dash where the report leaves the cell
    empty (not measured, or not a number)."""
    assert quant_table.format_measure(0.8851, ".3f") == "0.885" and quant_table.format_measure(61, ".0f") == "61"
    assert [quant_table.format_measure(v, ".2f") for v in (None, "n/a", True)] == [None, None, None]
    row = {"type": "Q4_K_M", "bytes": 101 * 2**20, "imatrix": True, "top1_agreement": 0.8851, "kl_mean": None,
           "ppl_gguf": 33.4, "exact_match": 0.96, "examples": 50, "decode_tokens_per_s": None}
    assert quant_table.markdown([row]).splitlines()[-1] == "| Q4_K_M | yes | 101 MiB | 0.885 | - | 33.40 | 0.96 (n=50) | - |"
