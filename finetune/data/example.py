"""One row on its way through prepare: the cleaned example, where it came from, and what the steps add to it.

``prepare`` makes one ``Example`` per cleaned row; dedupe gives it its key, group and MinHash signature
(finetune.data.clean), rendering its token arrays (finetune.data.encode), the split its split name
(finetune.data.split). The row's kind says which columns the tokenized splits get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    example: dict[str, Any]   # {"messages": [...]} or {"text": ...}, cleaned
    origin: str
    source: int
    role: str                 # "all", "train", "validation", "test" (the source's role)
    group: str
    key: str = ""             # exact-duplicate key (sha1 of the compared text)
    sig: Any = None           # MinHash signature
    ids: Any = None           # numpy int32 arrays
    labels: Any = None
    split: str = ""
    rejected_ids: Any = None  # preference pairs: the rejected conversation
    rejected_labels: Any = None
    prompt_length: int = 0    # preference rows: tokens before the final reply (the shared prompt)


def row_kind(example: dict[str, Any]) -> str:
    """"pairs" (chosen/rejected), "rated" (KTO's desirable/undesirable replies) or "sft"."""
    return "pairs" if "rejected" in example else "rated" if "desirable" in example else "sft"
