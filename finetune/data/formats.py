"""Row formats: detect which one a source uses and turn each row into chat messages (or raw text).

Supported: OpenAI-style ``messages`` (role/content; content may be a list of text parts), ShareGPT
``conversations`` (from/value), Alpaca (instruction/input/output), prompt/completion, raw ``text`` and, for
reward-driven training (``train.objective: grpo``), TRL's prompt-only rows (``prompt``: a text or a list of messages,
no reply; the row's other columns go to the reward functions, ``extra_columns``); for
preference tuning, pairs (``prompt``/``chosen``/``rejected``, strings or message lists; without ``prompt`` the
message lists' shared beginning is the prompt, as in Hub datasets like UltraFeedback) and KTO's unpaired rows
(``prompt``/``completion``/``label``, the label a boolean).
A recipe can force the format and map its own column names onto a format's fields (``columns:``).
Each row's turns are read by ``finetune.data.conversation`` (role names, text, tool calls, reasoning), the
same way in every format.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from finetune.data import conversation
from finetune.data.conversation import RowError
from finetune.errors import UserError

# format -> (required fields, optional fields)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("chosen", "rejected"), ("prompt", "system")),
    "kto": (("prompt", "completion", "label"), ("system",)),
    "messages": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "prompt": (("prompt",), ("system",)),
    "text": (("text",), ()),
}
# Names the reward functions already receive (training/rewards.py): a data column of that name cannot be passed too.
REWARD_ARGUMENTS = ("prompts", "completions", "reference", "completion_ids")
PROMPT_LIKE = ("question", "query", "prompt", "input", "instruction", "context", "source", "q", "user", "request")
ANSWER_LIKE = ("answer", "response", "output", "completion", "target", "reply", "a", "assistant", "label", "summary")


def check_columns(fmt: str, columns: dict[str, str], where: str) -> None:
    """A `columns:` mapping may only name fields of the chosen format."""
    if fmt == "auto" or not columns:
        return
    required, optional = FIELDS[fmt]
    unknown = [k for k in columns if k not in required + optional]
    if unknown:
        raise UserError(f"{where}.columns: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field of "
                        f"format '{fmt}'; its fields are: {', '.join(required + optional)} (map field: your_column)")


def column_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every column that appears in at least one row, in order of first appearance."""
    seen: dict[str, None] = {}
    for rec in records:
        for k in rec:
            seen.setdefault(k, None)
    return list(seen)


def _absent_column(column: str, field: str, mapped: bool, fmt: str, keys: list[str], *, source: str, where: str) -> UserError:
    same_case = [k for k in keys if k.lower() == column.lower()]
    close = same_case or difflib.get_close_matches(column, keys, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?{' (column names are case-sensitive)' if same_case else ''}" if close else ""
    found = ", ".join(keys) or "(none)"
    if mapped:
        return UserError(f"{where}.columns.{field}: column {column!r} is in no row of {source}. Columns found: "
                         f"{found}.{hint}")
    return UserError(f"{where}: format {fmt!r} needs a column {field!r}, which no row of {source} has. Columns found: "
                     f"{found}. Map yours: columns: {{{field}: <your column>}}.{hint}")


def check_fields_present(records: Iterable[dict[str, Any]], fmt: str, columns: dict[str, str], *, source: str,
                         where: str) -> None:
    """Every field the format needs (and every mapped one) is a column of at least one row.

    Without this, a misspelled column drops every row as ``missing_field`` and prepare "finishes" on nothing."""
    if fmt not in FIELDS:
        return
    keys = column_names(records)
    if not keys:
        return  # no row was read at all: the reader has reported why
    required, optional = FIELDS[fmt]
    for field in required + tuple(f for f in optional if f in columns):
        column = columns.get(field, field)
        if column not in keys:
            raise _absent_column(column, field, field in columns, fmt, keys, source=source, where=where)


def detect_format(records: Iterable[dict[str, Any]], columns: dict[str, str], *, source: str, where: str,
                  prompts: bool = False) -> str:
    """The format of a source from the keys of its first rows (after the `columns:` mapping).

    A `columns:` mapping narrows the choice to the formats that have the mapped fields; when none fits because
    a mapped column is in no row, the error names that column (not "cannot tell the row format"). ``prompts``:
    TRL's prompt-only rows (a ``prompt`` column and no reply) are the prompt format, which prepare keeps for
    reward-driven training and refuses otherwise; without it such rows cannot be told (a caller then suggests a
    reply column)."""
    records = list(records)
    keys = column_names(records)
    inverse = {theirs: field for field, theirs in columns.items()}
    present = {inverse.get(k, k) for k in keys}
    order = ("preference", "kto", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt", "text")
    order = order if prompts else tuple(f for f in order if f != "prompt")
    fitting = [fmt for fmt in order if all(f in FIELDS[fmt][0] + FIELDS[fmt][1] for f in columns)]
    for fmt in fitting or order:
        if fmt == "kto" and not _any_verdict(records, columns.get("label", "label")):
            continue  # no label is true/false: a class column beside prompt/completion, SFT rows (prepare notes it)
        if all(f in present for f in FIELDS[fmt][0]):
            return fmt
    absent = [(field, theirs) for field, theirs in columns.items() if theirs not in keys]
    if keys and absent:
        raise _absent_column(absent[0][1], absent[0][0], True, "auto", keys, source=source, where=where)
    raise UserError(f"{where}: {source}: cannot tell the row format. Columns found: {', '.join(keys) or '(none)'}. "
                    + suggest_mapping(keys))


def _any_verdict(records: list[dict[str, Any]], column: str) -> bool:
    """Whether a label column holds KTO verdicts: one true/false value makes it KTO's (the rows whose label is
    something else are then dropped as bad_label, each named), never plain prompt/completion with the labels lost."""
    return any(_label(r[column]) is not None for r in records if r.get(column) is not None)


def unused_label_note(records: Iterable[dict[str, Any]], origins: Iterable[str], fmt: str, columns: dict[str, str],
                      *, where: str) -> str | None:
    """What prepare says when detection read prompt/completion/label rows as prompt/completion (SFT) because no
    label is true or false: the label column is then not used, and the note names a value and its row."""
    column = columns.get("label", "label")
    if fmt != "prompt_completion":
        return None
    for rec, origin in zip(records, origins, strict=False):
        if rec.get(column) is not None:
            return (f"{where}: column {column!r} holds {rec[column]!r} ({origin}), not true/false, so the rows were "
                    "read as prompt/completion (SFT) and the label is not used. For KTO, make the label true or "
                    "false; to say SFT is meant, set format: prompt_completion")
    return None


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "good": True, "bad": False, "yes": True,
               "no": False, "desirable": True, "undesirable": False}


def _label(value: Any) -> bool | None:
    """KTO's label as a bool: booleans, 0/1, or true/false, yes/no, good/bad, desirable/undesirable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


def suggest_mapping(keys: list[str]) -> str:
    lower = {k.lower(): k for k in keys}
    prompt = next((lower[c] for c in PROMPT_LIKE if c in lower), None)
    answer = next((lower[c] for c in ANSWER_LIKE if c in lower and lower[c] != prompt), None)
    if prompt and answer:
        return (f"Add to the source:  format: prompt_completion  and  columns: {{prompt: {prompt}, completion: {answer}}}")
    return ("Add to the source a format (messages, sharegpt, alpaca, prompt_completion, text) and a mapping, e.g. "
            "columns: {prompt: <your question column>, completion: <your answer column>}")


def reply_mapping(keys: list[str]) -> str | None:
    """For prompt-only rows (format prompt): the column that looks like a reply, as a `columns:` mapping that reads
    the rows as prompt/completion; None when no column does."""
    lower = {k.lower(): k for k in keys}
    answer = next((lower[c] for c in ANSWER_LIKE if c in lower and lower[c] != lower.get("prompt")), None)
    return f"format: prompt_completion and columns: {{completion: {answer}}}" if answer else None


def extra_columns(rec: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """The row's columns that its format does not read (TRL passes a dataset's other columns to the reward functions
    as keyword arguments: ``answer=[...]``), in the row's order."""
    required, optional = FIELDS.get(fmt, ((), ()))
    read = {columns.get(f, f) for f in required + optional}
    return {k: v for k, v in rec.items() if k not in read}


def to_example(rec: dict[str, Any], fmt: str, columns: dict[str, str], *, default_input: str = "") -> dict[str, Any]:
    """One row as {"messages": [...]} or {"text": ...}. Raises RowError with the reason when unusable.

    When a role name was mapped (``human`` -> ``user``), the example also holds ``"roles_mapped":
    {"human->user": 1, ...}``; ``clean.clean_example`` moves that count into its changes."""
    seen = conversation.Seen()

    def get(name: str, required: bool = True) -> Any:
        col = columns.get(name, name)
        if col not in rec:
            if required:
                raise RowError("missing_field", f"missing field {col!r}")
            return None
        value = rec[col]
        if value is None and required:
            raise RowError("null_field", f"field {col!r} is null")
        return value

    if fmt == "text":
        return _with_mapped({"text": conversation.text(get("text"), columns.get("text", "text"), seen)}, seen)
    if fmt == "prompt":  # TRL's prompt-only row: the turns the model answers, no reply (reward-driven training)
        prompt = _prompt_turns(get("prompt"), columns.get("prompt", "prompt"), seen)
        return _with_mapped(_with_system({"messages": prompt, "prompt_only": True}, get, columns, seen), seen)
    if fmt == "preference":
        return _with_mapped(_pair(get, columns, seen), seen)
    if fmt == "kto":
        label = _label(get("label"))
        if label is None:
            raise RowError("bad_label", f"field {columns.get('label', 'label')!r} is {get('label')!r}: label must be "
                                        "true or false (KTO: true = desirable, false = undesirable)")
        prompt = _prompt_turns(get("prompt"), columns.get("prompt", "prompt"), seen)
        completion = _reply_turns(get("completion"), columns.get("completion", "completion"), seen)
        return _with_mapped(_with_system({"messages": prompt + completion, "desirable": label}, get, columns, seen), seen)
    if fmt == "messages":
        # A `messages` column may hold ShareGPT-style turns too (from/value): accept both.
        tools = conversation.tools_of(get("tools", required=False), columns.get("tools", "tools"))
        msgs = conversation.turns(get("messages"), columns.get("messages", "messages"), seen)
        conversation.check_tool_flow(msgs, tools, columns.get("messages", "messages"))
        return _with_mapped({"messages": msgs, **({"tools": tools} if tools else {})}, seen)
    if fmt == "sharegpt":
        msgs = conversation.turns(get("conversations"), columns.get("conversations", "conversations"), seen)
    elif fmt == "alpaca":
        instruction = conversation.text(get("instruction"), columns.get("instruction", "instruction"), seen)
        extra = get("input", required=False)
        extra = default_input if extra is None else conversation.text(extra, columns.get("input", "input"), seen)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": conversation.text(get("output"), columns.get("output", "output"), seen)}]
    elif fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        # TRL's conversational prompt/completion: both are lists of messages
        p = conversation.turns(prompt, "prompt", seen) if isinstance(prompt, list) else [
            {"role": "user", "content": conversation.text(prompt, columns.get("prompt", "prompt"), seen)}]
        c = conversation.turns(completion, "completion", seen) if isinstance(completion, list) else [
            {"role": "assistant",
             "content": conversation.text(completion, columns.get("completion", "completion"), seen)}]
        msgs = p + c
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return _with_mapped(_with_system({"messages": msgs}, get, columns, seen), seen)


def _prompt_turns(value: Any, name: str, seen: conversation.Seen) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return conversation.turns(value, name, seen)
    return [{"role": "user", "content": conversation.text(value, name, seen)}]


def _reply_turns(value: Any, name: str, seen: conversation.Seen) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return conversation.turns(value, name, seen)
    return [{"role": "assistant", "content": conversation.text(value, name, seen)}]


def _with_system(example: dict[str, Any], get, columns: dict[str, str], seen: conversation.Seen) -> dict[str, Any]:
    """The row's `system` column as its first turn (unless its turns have one)."""
    system = get("system", required=False)
    if system is None:
        return example
    system = conversation.text(system, columns.get("system", "system"), seen)
    msgs = example["messages"]
    if system.strip() and not any(m["role"] == "system" for m in msgs):
        example["messages"] = [{"role": "system", "content": system}] + msgs
        if "rejected" in example:
            example["rejected"] = [{"role": "system", "content": system}] + example["rejected"]
    return example


def _pair(get, columns: dict[str, str], seen: conversation.Seen) -> dict[str, Any]:
    """A preference pair as two whole conversations sharing their prompt: {"messages": prompt + chosen,
    "rejected": prompt + rejected}."""
    c_name, r_name = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    prompt_value = get("prompt", required=False)
    chosen, rejected = get("chosen"), get("rejected")
    if prompt_value is not None:
        prompt = _prompt_turns(prompt_value, columns.get("prompt", "prompt"), seen)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # Hub shape: whole conversations; the prompt is their shared beginning up to the last assistant turn
        c_all, r_all = conversation.turns(chosen, c_name, seen), conversation.turns(rejected, r_name, seen)
        n = 0
        while n < min(len(c_all), len(r_all)) - 1 and c_all[n] == r_all[n]:
            n += 1
        while n > 0 and c_all[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0 or any(m["role"] != "assistant" for m in c_all[n:] + r_all[n:]):
            raise RowError("no_shared_prompt", f"{c_name!r} and {r_name!r} do not start with the same prompt "
                                               "followed by assistant replies; add a 'prompt' column")
        return {"messages": c_all, "rejected": r_all}
    else:
        raise RowError("missing_field", f"no 'prompt' field, and {c_name!r}/{r_name!r} are not message lists "
                                        "that carry it; map the prompt column with columns: {prompt: <column>}")
    example = {"messages": prompt + _reply_turns(chosen, c_name, seen),
               "rejected": prompt + _reply_turns(rejected, r_name, seen)}
    return _with_system(example, get, columns, seen)


def _with_mapped(example: dict[str, Any], seen: conversation.Seen) -> dict[str, Any]:
    if seen.roles:
        example["roles_mapped"] = dict(seen.roles)
    if seen.numbers:
        example["numbers_as_text"] = dict(seen.numbers)
    return example

