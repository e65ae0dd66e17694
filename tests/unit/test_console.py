"""The console's number rules and text tables: plain when piped, numbers right-aligned, user text taken literally."""

from finetune import console


def test_number_rules():
    assert console.number(None) == "-"
    assert console.number(0.123456) == "0.1235" and console.number(2e-4) == "0.0002"
    assert console.number(1.5e-5) == "1.5e-05" and console.number(12) == "12" and console.number("ran") == "ran"
    assert console.duration(3.21) == "3.2 s" and console.duration(89.9) == "89.9 s"
    assert console.duration(184) == "3 min 4 s"
    assert console.gib(1.5 * 2**30) == "1.50 GiB" and console.mib(300 * 2**20) == "300 MiB"
    assert console.count(8_030_000_000) == "8.03B" and console.count(134_500_000) == "134.5M"


def test_table_is_plain_aligned_and_literal():
    text = console.table(["metric", "base", "note"], [["loss", 1.23456, "[bold]x[/bold]"], ["f1", None, ""]],
                         title="scores", indent=2)
    lines = text.splitlines()
    assert "\x1b[" not in text  # stdout is not a terminal under pytest
    assert lines[0] == "  scores" and lines[1].split() == ["metric", "base", "note"]
    assert "[bold]x[/bold]" in text  # cells are not read as rich markup
    loss, f1 = lines[3], lines[4]
    assert loss.startswith("  loss") and "1.235" in loss
    assert loss.index("1.235") + len("1.235") == f1.index("-") + 1  # numbers right-aligned
    assert all(line == line.rstrip() for line in lines)


def test_table_folds_only_when_given_a_width():
    long = "word " * 40
    assert len(console.table(["a", "b"], [["x", long]]).splitlines()) == 3
    folded = console.table(["a", "b"], [["x", long]], width=60).splitlines()
    assert len(folded) > 3 and max(len(line) for line in folded) <= 60
    assert console.table(["a"], [["x"]], header=False) == "x"
