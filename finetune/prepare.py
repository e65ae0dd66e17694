"""Stage `prepare`: read the recipe's data sources, clean them, split them without leakage, and tokenize them
with the model's own chat template.

Steps, in order (each one counted in report.json, every dropped row with its reason and file:line):
  1. read every source (local files or the Hub) and detect its format (messages, sharegpt, alpaca,
     prompt_completion, text) unless the recipe names it;
  2. turn rows into messages, normalise text, drop unusable rows (malformed, empty turns, unknown roles,
     not ending with an assistant turn...), add the default system prompt; for reward-driven training
     (train.objective grpo) keep prompt-only rows and the columns the reward functions receive;
  3. drop exact duplicates, then near duplicates (MinHash LSH);
  4. render with the chat template and tokenize; drop (or truncate) by length;
  5. split train/validation/test by seed (group-aware), then remove train rows that duplicate or nearly
     duplicate a validation/test row (leakage check); resample train rows by source weight;
  6. write splits/*.jsonl, tokenized/* (datasets), report.json, lengths.png, then manifest.json.

Outputs are reused when the source files, the data section, the seed and the tokenizer are unchanged (by
content: sha256, measured 1.6 s per GiB of data on a shared 2-core machine). The same fingerprint tells later stages when the prepared data
is stale (``finetune.prepare_inputs``). A new build is made beside the finished one and replaces it only when complete.
Prepare never finishes with an empty training split: it stops and says where the rows went.

Prompt-only rows (TRL's prompt-only datasets: a prompt, or a conversation ending with the user's turn, and no reply)
are kept only when train.objective is grpo: rendered up to the generation prompt with no trained token, and with
every column their format does not read (``extra_columns``), which training and eval pass to the reward functions
as keyword arguments. Any other objective refuses a source of such rows in one line naming the file and line.

The data algorithms are in finetune.data: cleaning and dedupe (clean), rendering and the length filter (encode),
the split and the leakage check (split); this module runs them in order and writes what they produced.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.data import tokenized
from finetune.data.example import Example, row_kind
from finetune.data.formats import RowError
from finetune.errors import UserError
from finetune.prepare_inputs import fingerprint_inputs
from finetune.run import artifacts, runs

SAMPLES_PER_REASON = 5


def run(recipe, upstream: artifacts.Upstream | None = None, *, recipe_path: str = "RECIPE",
        force: bool = False) -> dict[str, Any]:
    """Prepare the recipe's data; returns the report (also written to runs/<name>/prepare/report.json). Prepare reads
    no earlier stage (``upstream`` is empty)."""
    from finetune import models

    data = recipe.data
    if not data.sources:
        raise UserError("data.sources: no data sources; add one, e.g.\n  data:\n    sources:\n      - path: train.jsonl")
    resolved = models.resolve_model(recipe.model, recipe.base_dir)
    inputs = fingerprint_inputs(recipe, resolved.path)
    out = recipe.run_dir("prepare")
    runs.make_dir(recipe.run_dir())
    if not force and inputs.get("reusable"):
        cached = _reusable(out, inputs["fingerprint"], keeps_prompts(recipe))
        if cached is not None:
            cached["reused"] = True
            return cached
    tokenizer = models.load_tokenizer(resolved.path, trust_remote_code=recipe.model.trust_remote_code,
                                      chat_template=recipe.chat_template_path())
    with runs.StageRun(recipe, "prepare", inputs=inputs, upstream={}, aside=True) as stage:
        report = build(recipe, tokenizer, stage.work)
        if report["mix"]:
            stage.extra["mix"] = report["mix"]
        stage.record(artifacts.Prepared(
            splits={s: out / "splits" / f"{s}.jsonl" for s in artifacts.SPLITS},
            tokenized={s: out / "tokenized" / s for s in artifacts.SPLITS},
            rows=dict(report["splits"]), report=out / "report.json", lengths_png=out / "lengths.png",
        ))
    report["reused"] = False
    return report


def keeps_prompts(recipe) -> bool:
    """Whether prepare keeps prompt-only rows and the reward functions' columns: for reward-driven training."""
    return recipe.train.objective == "grpo"


# ------------------------------------------------------------------------------------------------ caching
def _reusable(out: Path, fingerprint: str, prompts: bool) -> dict[str, Any] | None:
    manifest = runs.read_manifest(out)
    if not manifest or manifest.get("inputs", {}).get("fingerprint") != fingerprint:
        return None
    report = out / "report.json"
    if report.is_file() and json.loads(report.read_text()).get("prompt_only", {}).get("kept", False) != prompts:
        return None  # prepared for another objective: prompt-only rows and reward columns kept or not
    try:
        prepared = artifacts.from_outputs(artifacts.Prepared, manifest.get("outputs") or {}, out.parent)
    except UserError:  # written by an older finetune: prepare again
        return None
    paths = [*prepared.splits.values(), *prepared.tokenized.values(), prepared.report]
    if not all(p.exists() for p in paths):
        return None
    return json.loads(prepared.report.read_text())


# ----------------------------------------------------------------------------------------------- the work
def build(recipe, tokenizer, out: Path) -> dict[str, Any]:
    from finetune.data import clean
    from finetune.data.encode import render_examples
    from finetune.data.load import Dropped
    from finetune.data.split import remove_leakage

    data = recipe.data
    dropped: list[Dropped] = []
    counters: Counter[str] = Counter()
    roles_mapped: Counter[str] = Counter()
    numbers: dict[str, list] = {}  # field -> [count, first origin]: numbers read as text
    notes: list[str] = []
    clock = _Clock()

    # 1-2. read, convert, clean
    examples, sources_report = _read_and_clean(recipe, dropped, counters, roles_mapped, numbers, notes)
    rows_in = sum(s["rows_in"] for s in sources_report)
    clock.lap("read_and_clean")

    # 3. exact then near duplicates
    examples, deduped = clean.drop_duplicates(examples, exact=data.clean.dedupe, near=data.clean.near_dedupe,
                                              near_threshold=data.clean.near_dedupe_threshold,
                                              need_signatures=data.split.leakage_check, dropped=dropped)
    clock.lap("dedupe")

    _check_one_kind(examples, data)
    # 4. render + tokenize, length filter
    examples = render_examples(examples, tokenizer, train_on=data.train_on, reasoning=data.reasoning,
                               max_tokens=data.clean.max_tokens, min_tokens=data.clean.min_tokens,
                               overlong=data.clean.overlong, dropped=dropped, counters=counters)
    clock.lap("render_and_tokenize")

    # 5. split, leakage check, weights
    pool = [e for e in examples if e.role == "all"]
    for e, split in zip(pool, _assign(pool, data, recipe.seed), strict=True):
        e.split = split
    for e in examples:
        if e.role != "all":
            e.split = e.role
    leakage = Counter()
    if data.split.leakage_check:
        examples = remove_leakage(examples, near_threshold=data.clean.near_dedupe_threshold, dropped=dropped,
                                  leakage=leakage)
    final, weights = _resample(examples, data, recipe.seed)
    clock.lap("split_and_leakage")
    if not final["train"]:
        raise UserError(_no_training_rows(recipe, rows_in, dropped, examples, pool, leakage, sources_report))
    notes += _split_notes(data, pool, final)
    notes += _prompt_notes(final)
    mix = _replay(recipe, tokenizer, out, final, notes) if data.mix.general > 0 else None
    clock.lap("replay")

    # 6. write
    report = {
        "rows_in": rows_in,
        "sources": sources_report,
        "dropped": dict(sorted(Counter(d.reason for d in dropped).items())),
        "dropped_total": len(dropped),
        "deduped": dict(deduped),
        "leakage_removed": dict(leakage),
        "weights": dict(weights),
        "normalized": counters["normalized"],
        "roles_mapped": dict(sorted(roles_mapped.items())),
        "numbers_as_text": {k: n for k, (n, _) in sorted(numbers.items())},
        "filled": {"system_prompt": counters["system_prompt_added"], "default_input": counters["default_input"],
                   "group_missing": counters["group_missing"]},
        "truncated": counters["truncated"],
        "splits": {s: len(v) for s, v in final.items()},
        "tokens": {},
        "samples": _samples(dropped),
        "notes": notes,
        "prompt_only": {"kept": keeps_prompts(recipe),
                        "rows": {s: sum(bool(e.example.get("prompt_only")) for e in v) for s, v in final.items()}},
        "extra_columns": sorted({k for v in final.values() for e in v for k in e.example.get("extra_columns", {})}),
        "train_on": data.train_on,
        "max_tokens": data.clean.max_tokens,
        "mix": mix,
        "seconds": clock.laps,
        "cpu_seconds": clock.cpu,
    }
    tokenized.write(out, final, report, max_tokens=data.clean.max_tokens)
    clock.lap("write")
    runs.atomic_write_json(out / "report.json", report)
    return report


def _read_and_clean(recipe, dropped: list, counters: Counter[str], roles_mapped: Counter[str],
                    numbers: dict[str, list], notes: list[str]) -> tuple[list[Example], list[dict[str, Any]]]:
    """Every source's rows as cleaned examples with their group, and a report line per source; unusable rows go
    to ``dropped`` with their reason. What was read differently from how it was written (numbers read as text, a
    label column left unused, a system prompt that no row takes) is counted and said in ``notes``."""
    from finetune.data import clean, formats
    from finetune.data.load import Dropped, excerpt

    data = recipe.data
    prompts = keeps_prompts(recipe)
    sources_report = []
    examples: list[Example] = []
    columns_seen: set[str] = set()
    for i, src in enumerate(data.sources):
        loaded, fmt = read_source(recipe, i)
        without_reply: list[str] = []  # rows dropped for having no assistant turn (prompt-only rows, kept by grpo)
        dropped += loaded.dropped
        if src.format == "auto":
            note = formats.unused_label_note((r.record for r in loaded.rows[:100]), (r.origin for r in loaded.rows),
                                             fmt, src.columns, where=f"data.sources[{i}]")
            notes += [note] if note else []
        columns_seen.update(loaded.rows[0].record if loaded.rows else {})
        kept = 0
        for row in loaded.rows:
            try:
                ex = _convert(row.record, fmt, src, data)
                ex, changes = clean.clean_example(
                    ex, unicode=data.clean.normalize_unicode, whitespace=data.clean.strip_whitespace,
                    require_assistant_last=data.clean.require_assistant_last, system_prompt=data.system_prompt,
                    prompt_only=prompts)
            except RowError as exc:
                dropped.append(Dropped(row.origin, exc.reason, exc.detail, excerpt(row.record)))
                if exc.reason == "no_assistant_turn":
                    without_reply.append(row.origin)
                continue
            if prompts and "messages" in ex and (extra := _extra_columns(row, fmt, src, i)):
                ex["extra_columns"] = extra
            counters["normalized"] += changes["normalized"]
            counters["system_prompt_added"] += changes["system_prompt_added"]
            roles_mapped.update(changes.get("roles_mapped") or {})
            for name, n in (changes.get("numbers_as_text") or {}).items():
                numbers.setdefault(name, [0, row.origin])[0] += n
            if fmt == "alpaca" and row.record.get(src.columns.get("input", "input")) is None:
                counters["default_input"] += 1
            group = None
            if data.split.group_by:
                group = row.record.get(data.split.group_by)
                if group is None:
                    counters["group_missing"] += 1
            elif (prompt := clean.prompt_text(ex)) is not None:
                # a prompt's pairs (or rated replies) stay in one split: no prompt is both trained and held out
                group = "prompt:" + clean.exact_key(prompt)[:16]
            examples.append(Example(ex, row.origin, i, src.role, "" if group is None else f"g:{group}"))
            kept += 1
        if not kept and without_reply and len(without_reply) == len(loaded.rows):
            raise UserError(_prompt_only_refusal(recipe, i, without_reply[0], "its conversation has no assistant "
                                                 f"reply, like all {len(without_reply)} rows of {loaded.name}", []))
        sources_report.append({"name": loaded.name, "format": fmt, "role": src.role,
                               "rows_in": len(loaded.rows) + len(loaded.dropped), "kept_after_cleaning": kept})
        del loaded  # the raw rows are no longer needed: free them before the next source
    if data.split.group_by and examples and counters["group_missing"] == len(examples):
        raise UserError(f"data.split.group_by: no row has a column {data.split.group_by!r}; "
                        f"columns found: {', '.join(sorted(columns_seen))}")
    if numbers:
        fields = ", ".join(f"{name} {n} (first: {origin})" for name, (n, origin) in sorted(numbers.items()))
        notes.append(f"{sum(n for n, _ in numbers.values())} numbers were read as text (a JSON or Parquet number "
                     f"where text belongs, e.g. 42 trained as \"42\"): {fields}. Nothing to do if they are meant as "
                     "text; otherwise fix those rows")
    conversations = sum("messages" in e.example for e in examples)
    if data.system_prompt and conversations and not counters["system_prompt_added"]:
        notes.append(f"data.system_prompt is set but was added to 0 rows: every one of the {conversations} "
                     "conversations has its own system message, which wins. Remove data.system_prompt, or the rows' "
                     "system messages")
    return examples, sources_report


def _extra_columns(row, fmt: str, src, i: int) -> dict[str, Any]:
    """The row's columns that its format does not read, as JSON values: what the reward functions receive."""
    from finetune.data import formats

    extra = formats.extra_columns(row.record, fmt, src.columns)
    taken = next((k for k in extra if k in formats.REWARD_ARGUMENTS), None)
    if taken is not None:
        raise UserError(f"data.sources[{i}]: {row.origin}: column {taken!r} would reach the reward functions as "
                        f"{taken}=, a name they already receive (docs/grpo.md); rename the column.")
    return json.loads(json.dumps(extra, ensure_ascii=False, default=str))


def _prompt_only_refusal(recipe, i: int, origin: str, what: str, keys: list[str]) -> str:
    """The one line that refuses prompt-only rows for an objective that learns from replies."""
    from finetune.data import formats

    mapping = formats.reply_mapping(keys)
    reply = f"give the rows their reply (e.g. {mapping})" if mapping else "give the rows their assistant reply"
    return (f"data.sources[{i}]: {origin} is a prompt-only row ({what}), and train.objective "
            f"{recipe.train.objective} learns from replies: {reply}, or train from rewards with "
            "train.objective: grpo and train.rewards (docs/grpo.md).")


def _prompt_notes(final: dict[str, list[Example]]) -> list[str]:
    """What prepare says about prompt-only rows and the columns the reward functions receive."""
    n = {s: sum(bool(e.example.get("prompt_only")) for e in v) for s, v in final.items()}
    names = sorted({k for v in final.values() for e in v for k in e.example.get("extra_columns", {})})
    notes = []
    if sum(n.values()):
        notes.append(f"{sum(n.values())} prompt-only rows (no reply: " + ", ".join(f"{k} {v}" for k, v in n.items())
                     + "); the rewards score their completions, and a reward that compares with a reference "
                     "(exact_match, numeric_match, tool_call_match) cannot")
    if names:
        notes.append(f"columns passed to the reward functions as keyword arguments: {', '.join(names)}")
    return notes


def _replay(recipe, tokenizer, out: Path, final: dict[str, list[Example]], notes: list[str]) -> dict[str, Any]:
    """Blend data.mix.general's replay rows (finetune.data.replay) into the training split; what was added."""
    from finetune import eval_models, hardware, models
    from finetune.data import replay
    from finetune.data.encode import render_examples

    data, m = recipe.data, recipe.model
    base, device = models.resolve_model(m, recipe.base_dir).path, hardware.device()
    options = eval_models.LoadOptions(device, m.dtype, m.trust_remote_code, m.attn_implementation)
    render = lambda rows: render_examples(  # noqa: E731  (as the task rows were rendered)
        rows, tokenizer, train_on=data.train_on, reasoning=data.reasoning, max_tokens=data.clean.max_tokens,
        min_tokens=data.clean.min_tokens, overlong=data.clean.overlong, dropped=[], counters=Counter())
    mix = replay.blend(final["train"], tokenizer, render, fraction=data.mix.general, base_dir=base, device=device,
                       load_model=lambda: eval_models.load_causal_lm(base, options), reasoning=data.reasoning,
                       cache_from=recipe.run_dir("prepare"), cache_to=out, seed=recipe.seed)
    notes.append(mix["note"])
    return mix


def _resample(examples: list[Example], data, seed: int) -> tuple[dict[str, list[Example]], Counter[str]]:
    """The rows of each split, train rows repeated or left out by their source's weight; the weights' counts."""
    from finetune.data.split import resample_by_weight

    final: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    weights: Counter[str] = Counter()
    for e in examples:
        copies = 1
        weight = data.sources[e.source].weight
        if e.split == "train" and weight != 1:
            copies = resample_by_weight([e.key], weight, seed=seed)[0]
            weights["train_rows_added" if copies > 1 else "train_rows_removed"] += abs(copies - 1)
        final[e.split] += [e] * copies
    return final, weights


# What to change when most rows are dropped for a reason.
DROP_FIXES = {
    "too_long": "raise data.clean.max_tokens (now {max_tokens}) or set data.clean.overlong: truncate",
    "too_short": "lower data.clean.min_tokens (now {min_tokens})",
    "exact_duplicate": "the rows repeat each other: add distinct examples (or set data.clean.dedupe: false)",
    "near_duplicate": "the rows are near copies: add distinct examples (or set data.clean.near_dedupe: false)",
    "not_ending_with_assistant": "end each conversation with an assistant turn (or set "
                                 "data.clean.require_assistant_last: false)",
    "no_assistant_turn": "give each conversation its assistant reply; prompt-only rows train with "
                         "train.objective: grpo and train.rewards (docs/grpo.md)",
    "reply_in_prompt": "end each prompt with the turn the model answers; put replies in a completion column",
    "missing_field": "name the columns with data.sources[N].columns, or set data.sources[N].format",
    "null_field": "fill the empty fields, or map other columns with data.sources[N].columns",
    "unknown_role": "use the roles system, user and assistant",
    "no_trained_tokens": "check data.train_on, and raise data.clean.max_tokens if truncation cut the replies",
    "leakage_exact": "the training rows repeat validation/test rows: add distinct examples "
                     "(or set data.split.leakage_check: false)",
    "leakage_near": "the training rows nearly repeat validation/test rows: add distinct examples "
                    "(or set data.split.leakage_check: false)",
    "leakage_group": "every group is in validation/test: check data.split.group_by",
    "identical_pair": "give each pair a rejected reply that differs from its chosen one",
    "pair_prompt_mismatch": "give chosen and rejected the same prompt (the same turns before the final reply)",
    "no_shared_prompt": "add a prompt column, or make chosen/rejected message lists that start with the same turns",
    "bad_label": "make the label column true (desirable) or false (undesirable)",
}


def _no_training_rows(recipe, rows_in: int, dropped, examples: list[Example], pool: list[Example],
                      leakage: Counter, sources_report: list[dict[str, Any]]) -> str:
    """Why the training split came out empty, with the numbers and what to change (prepare then stops)."""
    data = recipe.data
    names = ", ".join(s["name"] for s in sources_report)
    if rows_in == 0:
        return (f"data.sources: no rows were read from {names}: the file is empty or holds only blank lines. "
                "Add examples (one JSON object per line for .jsonl), then run `finetune prepare` again.")
    reasons = Counter(d.reason for d in dropped).most_common()
    top = ", ".join(f"{n} {r}" for r, n in reasons[:3]) + (" ..." if len(reasons) > 3 else "")
    held = Counter(e.split for e in examples)
    if held["train"]:  # training rows were left after the split and the leakage check: the source weights removed them
        weights = ", ".join(f"data.sources[{i}].weight={s.weight}" for i, s in enumerate(data.sources)
                            if s.weight < 1 and any(e.source == i and e.split == "train" for e in examples))
        others = " and ".join(f"{held[s]} to {s}" for s in ("validation", "test") if held[s])
        return (f"no training row is left: {weights} resampled all {held['train']} training rows away"
                + (f" (the other rows went {others})" if others else "") + ". Raise the weight (1.0 keeps every "
                "row), then run `finetune prepare` again.")
    if not examples:
        first = next(d for d in dropped if d.reason == reasons[0][0]) if reasons else None
        fix = DROP_FIXES.get(reasons[0][0], "fix the rows named in the report") if reasons else ""
        fix = fix.format(max_tokens=data.clean.max_tokens, min_tokens=data.clean.min_tokens)
        example = f" (e.g. {first.origin}: {first.detail})" if first else ""
        return (f"no training row is left: all {rows_in} rows read were dropped ({top}){example}. To keep them: "
                f"{fix}; then run `finetune prepare` again.")
    where = " and ".join(f"{held[s]} to {s}" for s in ("validation", "test") if held[s])
    removed = sum(leakage.values())
    if not pool and not any(s.role == "train" for s in data.sources):
        cause = "no source has role: train (or all). Add a training source, or give one of them role: all"
    elif removed:
        cause = (f"{removed} training rows were removed as leakage (equal or nearly equal to a validation/test row: "
                 f"{top}). Add distinct examples, or set data.split.leakage_check: false")
    else:
        cause = "lower data.split.validation / data.split.test, or add rows"
    return f"no training row is left from {rows_in} rows read: {where}; {cause}. Then run `finetune prepare` again."


def _split_notes(data, pool: list[Example], final: dict[str, list[Example]]) -> list[str]:
    """Say why a split the recipe asked for is empty (a validation split is carved whenever it can be)."""
    notes = []
    groups = len({e.group for e in pool})
    for split, ratio in (("validation", data.split.validation), ("test", data.split.test)):
        if final[split] or any(s.role == split for s in data.sources):
            continue
        if ratio > 0 and pool:
            one = (f"all {len(pool)} rows share one data.split.group_by value" if data.split.group_by and groups == 1
                   else f"only {groups} distinct row(s) remain" if groups < 3 else "the rows could not be divided")
            notes.append(f"the {split} split is empty although data.split.{split} is {ratio}: {one}, and training "
                         "keeps at least one. " + ("Training runs without validation loss." if split == "validation"
                                                   else "`finetune eval` needs a test split.") + " Add rows.")
        elif split == "validation":
            notes.append("no validation split (data.split.validation is 0 or no source has role: validation): "
                         "training runs without validation loss, early stopping and best-step selection.")
    return notes


class _Clock:
    """Wall and CPU seconds per step, for the report (where does the time go on a large dataset?)."""

    def __init__(self):
        import time

        self._wall, self._cpu = time.perf_counter, time.process_time
        self._last = (self._wall(), self._cpu())
        self.laps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = (self._wall(), self._cpu())
        self.laps[name] = round(now[0] - self._last[0], 3)
        self.cpu[name] = round(now[1] - self._last[1], 3)
        self._last = now


def read_source(recipe, i: int):
    """(Loaded rows, format) of data.sources[i]."""
    from finetune.data import formats, load

    src = recipe.data.sources[i]
    where = f"data.sources[{i}]"
    if src.path is not None:
        loaded = load.read_local(recipe.resolve_path(src.path), where=f"{where}.path", max_rows=src.max_rows)
        is_txt = Path(src.path).suffix.lower() == ".txt"
    else:
        loaded = load.read_hub(src.hub, config=src.config, split=src.split, revision=src.revision,
                               streaming=src.streaming, max_rows=src.max_rows, where=f"{where}.hub")
        is_txt = False
    fmt = src.format
    if is_txt and fmt not in ("auto", "text"):
        raise UserError(f"{where}: {loaded.name} is a .txt file, which holds raw text; set format: text (or auto)")
    formats.check_columns("text" if is_txt else fmt, src.columns, where)
    if fmt == "prompt" and loaded.rows and not keeps_prompts(recipe):
        raise UserError(_prompt_only_refusal(recipe, i, loaded.rows[0].origin, "format prompt: a prompt, no reply",
                                             formats.column_names(r.record for r in loaded.rows[:100])))
    if fmt not in ("auto", "text") and loaded.rows:
        # a misspelled mapped column would otherwise drop every row as missing_field and "finish"
        formats.check_fields_present((r.record for r in loaded.rows), fmt, src.columns, source=loaded.name,
                                     where=where)
    if fmt == "auto":
        if is_txt:
            fmt = "text"
        elif not loaded.rows:
            fmt = "messages"  # nothing to detect from; every row was dropped already (reported)
        else:
            fmt = formats.detect_format((r.record for r in loaded.rows[:100]), src.columns, source=loaded.name,
                                        where=where, prompts=True)  # refused below unless train.objective is grpo
        if fmt == "prompt" and not keeps_prompts(recipe):
            raise UserError(_prompt_only_refusal(recipe, i, loaded.rows[0].origin, "a prompt, no reply",
                                                 formats.column_names(r.record for r in loaded.rows[:100])))
    return loaded, fmt


def _convert(record: dict[str, Any], fmt: str, src, data) -> dict[str, Any]:
    from finetune.data import formats

    return formats.to_example(record, fmt, src.columns, default_input=data.default_input)


def _assign(pool: list[Example], data, seed: int) -> list[str]:
    from finetune.data.split import assign_splits

    return assign_splits([e.group for e in pool], validation=data.split.validation, test=data.split.test, seed=seed)


def _check_one_kind(examples: list[Example], data) -> None:
    """Every row of a run is an SFT row, a preference pair or a rated (KTO) row: the tokenized splits hold one."""
    kinds: dict[str, int] = {}
    for e in examples:
        kinds.setdefault(row_kind(e.example), e.source)
    if len(kinds) > 1:
        named = ", ".join(f"{k} (e.g. data.sources[{i}])" for k, i in kinds.items())
        raise UserError(f"data.sources mix row kinds: {named}. One run trains on one kind: SFT rows "
                        "(messages, prompt/completion...), preference pairs (prompt/chosen/rejected) or rated rows "
                        "(prompt/completion/label). Split them into separate recipes.")


def _samples(dropped) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for d in dropped:
        bucket = out.setdefault(d.reason, [])
        if len(bucket) < SAMPLES_PER_REASON:
            bucket.append({"origin": d.origin, "detail": d.detail, "row": d.row})
    return dict(sorted(out.items()))
