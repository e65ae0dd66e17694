"""Preference objectives (DPO, KTO, ORPO, SimPO): our losses equal TRL's on the same batch and model, and training them
on a tiny model gives pinned (golden) losses.

The TRL tests build TRL's own trainer on a tiny random Llama with a LoRA adapter (weights perturbed so that the
policy differs from the adapter-disabled reference), take one batch from TRL's collator, compute TRL's loss, turn
the same token rows into our rows and compute ours, packed and padded.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import yaml
from train_fixtures import record_prepared, tiny_llama

from finetune import recipe as recipe_mod
from finetune import train
from finetune.training import attention, preference

pytest.importorskip("trl", reason="TRL is the reference implementation these tests compare with (pip install trl)")

TOLERANCE = 1e-5


def _perturb_adapter(model) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _rows_from(input_ids, attention_mask, completion_mask) -> list[tuple[list[int], list[int], int]]:
    """TRL's padded rows -> (input_ids, labels, prompt_length) with labels = the completion mask."""
    out = []
    for ids, att, comp in zip(input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist(), strict=True):
        n = sum(att)
        ids, comp = ids[:n], comp[:n]
        labels = [t if c else -100 for t, c in zip(ids, comp, strict=True)]
        out.append((ids, labels, comp.index(1)))
    return out


def _our_loss(model, rows, settings, *, packing: bool, pad_id: int):
    """Our loss on one micro-batch holding the whole step, with the adapter-disabled base as reference."""
    import torch

    def forward(seqs):
        return preference.sequence_logps(model, seqs, packing=packing, pad_id=pad_id, device="cpu")

    base = model.get_base_model()
    base.set_attn_implementation(attention.register() if packing else "sdpa")
    try:
        reference = preference.Reference(model, adapters=True, packing=packing, pad_id=pad_id, device="cpu")
        step_chosen = preference.chosen_targets(rows)
        res = preference.batch_loss(forward, reference, rows, list(range(len(rows))), rows, settings,
                                    step_units=len(rows), step_chosen_targets=step_chosen,
                                    no_grad_forward=lambda seqs: forward(seqs))
        with torch.no_grad():
            return float(res.loss), res
    finally:
        base.set_attn_implementation("sdpa")


def _config(cls, **kw):
    return cls(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, fp16=False, **kw)


@pytest.mark.parametrize("packing", [True, False])
def test_dpo_loss_equals_trl(tokenizer_dir, packing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = tiny_llama(tokenizer_dir)
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "It is five, I think."}]},
        {"prompt": [{"role": "user", "content": "Name a colour"}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "7"}]},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "London, the capital of France."}]},
    ])
    trainer = DPOTrainer(model=model, args=_config(DPOConfig, per_device_train_batch_size=3, beta=0.3),
                         train_dataset=ds, processing_class=tok, peft_config=_lora())
    _perturb_adapter(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = float(trainer._compute_loss(trainer.model, batch, return_outputs=False).detach())
    seqs = _rows_from(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = len(seqs) // 2
    rows = [preference.Row(((c[0], c[1]), (r[0], r[1])), c[2]) for c, r in zip(seqs[:n], seqs[n:], strict=True)]
    ours, res = _our_loss(trainer.model, rows, preference.Settings("dpo", beta=0.3), packing=packing,
                          pad_id=tok.pad_token_id)
    assert abs(theirs - 0.6931) > 1e-3  # the policy really differs from the reference
    print(f"packing={packing}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert res.units == 3


@pytest.mark.parametrize("packing", [True, False])
def test_kto_loss_equals_trl(tokenizer_dir, packing):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, tok = tiny_llama(tokenizer_dir)
    rows_in = [("What is 2+2?", "4", True), ("Name a colour", "Seven, obviously", False), ("Say hi", "Hi!", True),
               ("Spell cat", "k a t", False)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                             "completion": [{"role": "assistant", "content": c}], "label": lab}
                            for p, c, lab in rows_in])
    trainer = KTOTrainer(model=model, args=_config(KTOConfig, per_device_train_batch_size=4, beta=0.5,
                                                   desirable_weight=1.0, undesirable_weight=1.5),
                         train_dataset=ds, processing_class=tok, peft_config=_lora())
    _perturb_adapter(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = float(trainer._compute_loss(trainer.model, batch, return_outputs=False).detach())
    seqs = _rows_from(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    rows = [preference.Row(((ids, labels),), p, bool(d))
            for (ids, labels, p), d in zip(seqs, batch["label"].tolist(), strict=True)]
    # our mismatched pairs are TRL's (x_i, y_{i-1}) rotation
    kl = _rows_from(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    for i, (ids, labels, _) in enumerate(kl):
        assert preference.kl_sequence(rows[i], rows[preference.kl_partner(i, len(rows))]) == (ids, labels)
    ours, _ = _our_loss(trainer.model, rows, preference.Settings("kto", beta=0.5, desirable_weight=1.0,
                                                                 undesirable_weight=1.5),
                        packing=packing, pad_id=tok.pad_token_id)
    assert abs(theirs - 0.5 * (1 + 1.5 * 2) / 4) > 1e-3  # not the loss of a policy equal to its reference
    print(f"packing={packing}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, abs=TOLERANCE)


@pytest.mark.parametrize("packing", [True, False])
def test_orpo_loss_equals_trl(tokenizer_dir, packing):
    """TRL's ORPO puts the prompt into the NLL; a one-token prompt (no BOS) has no prompt token to predict, so the
    two definitions meet and the whole loss (NLL + odds ratio) must agree."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tok = tiny_llama(tokenizer_dir)
    tok.bos_token = None
    ds = Dataset.from_list([{"prompt": "Hi", "chosen": " there, friend.", "rejected": " go away"},
                            {"prompt": "Yes", "chosen": " it is true", "rejected": " no"},
                            {"prompt": "Why", "chosen": " because the sky scatters blue light", "rejected": " ok"}])
    trainer = ORPOTrainer(model=model, args=_config(ORPOConfig, per_device_train_batch_size=3, beta=0.25),
                          train_dataset=ds, processing_class=tok, peft_config=_lora())
    _perturb_adapter(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["prompt_input_ids"].shape[1] == 1
    theirs = float(trainer.get_batch_loss_metrics(trainer.model, batch)[0].detach())
    rows = _pairs_of(batch, prompt_length=lambda chosen: 1)
    ours, res = _our_loss(trainer.model, rows, preference.Settings("orpo", beta=0.25), packing=packing,
                          pad_id=tok.pad_token_id)
    print(f"packing={packing}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert 0 <= res.correct <= 3


def _pairs_of(batch, *, prompt_length) -> list:
    """Our preference rows from a TRL encoder-free pair batch (chosen/rejected ids and labels, padded)."""
    rows = []
    for k in range(len(batch["chosen_input_ids"])):
        pair = []
        for side in ("chosen", "rejected"):
            n = int(batch[f"{side}_attention_mask"][k].sum())
            pair.append((batch[f"{side}_input_ids"][k, :n].tolist(), batch[f"{side}_labels"][k, :n].tolist()))
        rows.append(preference.Row(tuple(pair), prompt_length(pair[0])))
    return rows


@pytest.mark.parametrize("packing", [True, False])
def test_simpo_loss_equals_trl(tokenizer_dir, packing):
    """TRL's SimPO is its CPO trainer with loss_type="simpo" and no NLL term (cpo_alpha=0): both average each reply's
    log-probability over its completion tokens."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tok = tiny_llama(tokenizer_dir)
    ds = Dataset.from_list([{"prompt": "Hi", "chosen": " there, friend.", "rejected": " go away"},
                            {"prompt": "Is it", "chosen": " true", "rejected": " no, it is not the case"},
                            {"prompt": "Why", "chosen": " because the sky scatters blue light", "rejected": " ok"}])
    config = _config(CPOConfig, per_device_train_batch_size=3, beta=2.0, loss_type="simpo", simpo_gamma=0.7,
                     cpo_alpha=0.0)
    trainer = CPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=_lora())
    _perturb_adapter(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = float(trainer.get_batch_loss_metrics(trainer.model, batch)[0].detach())
    rows = _pairs_of(batch, prompt_length=lambda chosen: chosen[1].count(-100))  # the prompt: untrained
    ours, res = _our_loss(trainer.model, rows, preference.Settings("simpo", beta=2.0, gamma=0.7), packing=packing,
                          pad_id=tok.pad_token_id)
    assert abs(theirs - 0.6931) > 1e-2  # the rewards differ: not the loss of a tie
    print(f"packing={packing}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, abs=TOLERANCE)
    assert res.units == 3


def test_loss_functions_match_trl_formulas_on_random_logps():
    """The pure loss maths against TRL's own ORPO helper and the published formulas, beyond one batch."""
    import torch
    import torch.nn.functional as F
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp

    g = torch.Generator().manual_seed(0)
    x = -torch.rand(1000, generator=g, dtype=torch.float64) * 8 - 1e-6
    assert torch.allclose(preference.log1mexp(x), trl_log1mexp(x))
    pc, pr, rc, rr = (-torch.rand(64, generator=g) * 50 for _ in range(4))
    losses, cr, rr_ = preference.dpo_losses(pc, pr, rc, rr, 0.1)
    assert torch.allclose(losses, -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))
    assert torch.equal(cr > rr_, (pc - rc) > (pr - rr))
    kl = preference.kto_kl(pc, rc)
    assert float(kl) >= 0


# ------------------------------------------------------------------------------ training (golden losses)
def _pref_rows(n: int, seed: int, *, unpaired: bool) -> dict[str, list]:
    """Synthetic preference data: a random prompt, the chosen answer a fixed run of tokens (learnable), the
    rejected answer random tokens."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "prompt_length": []}
    if unpaired:
        cols["desirable"] = []
    else:
        cols["rejected_input_ids"], cols["rejected_labels"] = [], []
    for k in range(n):
        prompt = [rng.randint(10, 400) for _ in range(rng.randint(3, 12))]
        good = [100 + j for j in range(rng.randint(2, 8))] + [2]
        bad = [rng.randint(500, 900) for _ in range(rng.randint(2, 8))] + [2]
        if unpaired:
            answer = good if k % 2 == 0 else bad
            cols["input_ids"].append(prompt + answer)
            cols["labels"].append([-100] * len(prompt) + answer)
            cols["desirable"].append(int(k % 2 == 0))
        else:
            cols["input_ids"].append(prompt + good)
            cols["labels"].append([-100] * len(prompt) + good)
            cols["rejected_input_ids"].append(prompt + bad)
            cols["rejected_labels"].append([-100] * len(prompt) + bad)
        cols["prompt_length"].append(len(prompt))
        cols["length"].append(len(cols["input_ids"][-1]))
    return cols


def prepared_preferences(tmp: Path, model_dir: Path, *, unpaired: bool = False, n_train: int = 32, n_val: int = 8,
                         **train_settings):
    from datasets import Dataset

    data = {"name": "p", "seed": 42, "runs_dir": str(tmp / "runs"),
            "model": {"id": str(model_dir), "dtype": "float32"}, "train": train_settings}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = recipe_mod.load(path)
    tokenized = recipe.run_dir("prepare") / "tokenized"
    paths = {}
    for split, n, s in (("train", n_train, 0), ("validation", n_val, 1)):
        Dataset.from_dict(_pref_rows(n, s, unpaired=unpaired)).save_to_disk(str(tokenized / split))
        paths[split] = tokenized / split
    record_prepared(recipe, paths, {"train": n_train, "validation": n_val})
    return recipe


def _log(recipe) -> list[dict]:
    import json

    return [json.loads(x) for x in (recipe.run_dir("train") / "log.jsonl").read_text().splitlines()]


# Losses of the first 4 steps (batch 4, lr 1e-2, constant), recorded from this implementation on the tiny model.
GOLDEN = {
    ("dpo", "lora"): [0.693147, 0.648440, 0.578075, 0.565557],
    ("kto", "lora"): [0.5, 0.488730, 0.472767, 0.463071],
    ("orpo", "lora"): [10.926834, 10.676854, 10.496152, 10.297998],
    ("simpo", "lora"): [0.978445, 0.968116, 0.956153, 0.942381],
    ("dpo", "full"): [0.693147, 0.657864, 0.607700, 0.595789],
}


@pytest.mark.parametrize("objective,method", list(GOLDEN))
def test_golden_losses_and_reward_accuracy_rises(tmp_path, tiny_model_dir, objective, method):
    recipe = prepared_preferences(tmp_path, tiny_model_dir, unpaired=objective == "kto", objective=objective,
                                  method=method, max_steps=8, batch_size=4, lr=1e-2 if method != "full" else 1e-3,
                                  scheduler="constant", warmup_ratio=0.0, log_every=1, eval_every=8, save_every=100)
    summary = train.run(recipe)
    log = _log(recipe)
    losses = [e["loss"] for e in log if e["loss"] is not None]
    assert len(losses) == 8
    if objective in ("dpo", "kto"):
        assert losses[0] == pytest.approx(0.6931 if objective == "dpo" else 0.5, abs=1e-4)  # policy == reference
    assert losses[:4] == pytest.approx(GOLDEN[(objective, method)], abs=1e-3)
    assert summary["objective"] == objective
    assert summary["validation_reward"]["reward_accuracy"] >= 0.75


def test_kto_takes_pairs_as_a_desirable_and_an_undesirable_row(tmp_path, tiny_model_dir):
    recipe = prepared_preferences(tmp_path, tiny_model_dir, n_train=8, n_val=4, objective="kto", max_steps=2,
                                  batch_size=4, log_every=1, eval_every=100, save_every=100)
    rows = preference.load_rows(recipe.run_dir("prepare") / "tokenized" / "train", "train", "kto")
    assert len(rows) == 16 and [r.desirable for r in rows[:4]] == [True, False, True, False]
    assert list(rows[0].sequences[0][0][:rows[0].prompt_length]) == list(rows[1].sequences[0][0][:rows[1].prompt_length])
    summary = train.run(recipe)
    assert summary["steps"] == 2 and summary["objective"] == "kto"


def test_sft_on_rated_rows_never_trains_on_an_undesirable_reply(tmp_path, tiny_model_dir):
    recipe = prepared_preferences(tmp_path, tiny_model_dir, unpaired=True, n_train=8, n_val=4, max_steps=1,
                                  batch_size=8, log_every=1, eval_every=100, save_every=100)
    from finetune.training import rows as split_rows

    rows = split_rows.load_sft_rows(recipe.run_dir("prepare") / "tokenized" / "train", "train")
    assert len(rows) == 4  # the 4 desirable of 8
    assert all(100 <= t < 110 or t == 2 for _, labels in rows for t in labels if t != -100)


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_pair_objective_on_sft_or_unpaired_data_is_a_clear_error(tmp_path, tiny_model_dir, objective):
    from finetune.errors import UserError

    recipe = prepared_preferences(tmp_path, tiny_model_dir, unpaired=True, n_train=4, n_val=2, objective=objective)
    with pytest.raises(UserError, match=f"train.objective {objective} needs pairs .*set train.objective=kto"):
        train.run(recipe)


def test_preference_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """A DPO run stopped at step 2 of 4 and resumed ends with the same adapter as an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    settings = dict(objective="dpo", max_steps=4, batch_size=4, lr=1e-2, scheduler="constant", log_every=1,
                    eval_every=2, save_every=100)
    whole = prepared_preferences(tmp_path / "a", tiny_model_dir, n_train=16, n_val=4, **settings)
    train.run(whole)
    parts = prepared_preferences(tmp_path / "b", tiny_model_dir, n_train=16, n_val=4, **settings)
    first = train.run(parts, on_eval=lambda step, val: step == 2)
    assert first["steps"] == 2 and first["stop_reason"] == "on_eval"
    second = train.run(parts, resume=True)
    assert second["steps"] == 4
    a = load_file(str(whole.run_dir("train") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(parts.run_dir("train") / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
