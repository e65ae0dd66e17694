"""Helpers for the train tests: a prepared run (tokenized splits + prepare manifest, per the prepare contract).

The data is synthetic but learnable: a random prompt (label -100) followed by an answer that is a fixed function
of its length only, so the loss visibly falls within a few steps on a tiny model.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from finetune import recipe as recipe_mod
from finetune.run import artifacts, runs


def synthetic_rows(n: int, seed: int, *, min_len: int = 6, max_len: int = 40) -> dict[str, list]:
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        prompt = [rng.randint(10, 400) for _ in range(rng.randint(min_len // 2, max_len // 2))]
        answer = [100 + k for k in range(rng.randint(2, max(3, max_len // 2)))] + [2]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return {"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]}


def example_pairs(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs of varied lengths, as the batching functions take them."""
    rows = synthetic_rows(n, seed, min_len=4, max_len=60)
    return list(zip(rows["input_ids"], rows["labels"], strict=True))


def load_model(model_dir: Path, attn: str, dtype=None, device: str = "cpu"):
    """The tiny model in eval mode without a KV cache (fp32 unless told), on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model.to(device).eval()


def recipe_dict(tmp: Path, model_dir: Path, name: str = "t", *, seed: int = 42, model: dict | None = None,
                export: dict | None = None, **train: Any) -> dict[str, Any]:
    return {"name": name, "seed": seed, "runs_dir": str(tmp / "runs"),
            "model": {"id": str(model_dir), **(model or {})}, "train": train, **({"export": export} if export else {})}


def prepared(tmp: Path, model_dir: Path, name: str = "t", *, n_train: int = 48, n_val: int = 12, data_seed: int = 0,
             seed: int = 42, model: dict | None = None, export: dict | None = None, **train: Any):
    """Write recipe YAML + tokenized splits + prepare manifest; return the loaded recipe."""
    from datasets import Dataset

    data = recipe_dict(tmp, model_dir, name, seed=seed, model=model, export=export, **train)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = recipe_mod.load(path)
    tokenized = recipe.run_dir("prepare") / "tokenized"
    paths = {}
    for split, n, s in (("train", n_train, data_seed), ("validation", n_val, data_seed + 1)):
        if n:
            Dataset.from_dict(synthetic_rows(n, s)).save_to_disk(str(tokenized / split))
            paths[split] = tokenized / split
    record_prepared(recipe, paths, {"train": n_train, "validation": n_val})
    return recipe


def record_prepared(recipe, tokenized: dict[str, Path], rows: dict[str, int]) -> None:
    """Finish the prepare stage of ``recipe`` over tokenized splits written by hand (its typed record)."""
    folder = recipe.run_dir("prepare")
    with runs.StageRun(recipe, "prepare") as stage:
        stage.record(artifacts.Prepared(splits={}, tokenized=tokenized, rows=rows, report=folder / "report.json",
                                        lengths_png=folder / "lengths.png"))


def train_losses(log_path: Path) -> list[tuple[int, float]]:
    import json

    lines = [json.loads(x) for x in Path(log_path).read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if x["loss"] is not None]


def val_losses(log_path: Path) -> list[tuple[int, float]]:
    import json

    lines = [json.loads(x) for x in Path(log_path).read_text().splitlines()]
    return [(x["step"], x["val_loss"]) for x in lines if x["val_loss"] is not None]


def tiny_llama(tokenizer_dir):
    """A 2-layer random Llama (width 64, tied embeddings, fp32, seed 0) over the tokenizer in ``tokenizer_dir``: the
    model the objective tests compare with TRL on. Returns (model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float(), tok
