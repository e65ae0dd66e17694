"""GRPO: our loss equals TRL's GRPOTrainer for every loss normalisation (packed and padded), the advantages equal
TRL's on the same rewards, the rewards (built-in and the user's) and their bad input, sampling (a draw from the
softmax; a completion depends on its seed only, not on the rows beside it), the step-wide reward statistics, a
golden reward curve on a tiny model and resume == uninterrupted. 2 processes == 1 and a killed run resumed:
tests/integration/test_train_grpo_processes.py."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
import yaml
from train_fixtures import record_prepared, tiny_llama

from finetune import recipe as recipe_mod
from finetune import train
from finetune.errors import UserError
from finetune.training import attention, grpo, rewards, rollout

TOLERANCE = 1e-6


def _trl_trainer(tokenizer_dir, reward_funcs=None, **config):
    """TRL's GRPOTrainer on a tiny Llama with a LoRA adapter whose B weights are perturbed (policy != base)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    model, tok = tiny_llama(tokenizer_dir)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in ("2+2?", "Name a colour", "Hi")])
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, fp16=False,
                      **{"per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 8, **config})
    funcs = reward_funcs or [lambda completions, **_: [1.0] * len(completions)]
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args,
                          train_dataset=ds, processing_class=tok,
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    trainer.current_gradient_accumulation_steps = 1
    return trainer, tok


def _batch(tok):
    """Four (prompt, completion) token rows of different lengths, as TRL holds them: prompts left-padded,
    completions right-padded."""
    import torch

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in ("What is 2+2?", "Name a colour", "Say hi", "Why is the sky blue?")]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rng = random.Random(3)
    completions = [[rng.randint(100, 2000) for _ in range(n)] + [tok.eos_token_id] for n in (2, 7, 4, 5)]
    pw, cw = max(map(len, prompts)), max(map(len, completions))
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (pw - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (pw - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad] * (cw - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (cw - len(c)) for c in completions])
    return prompts, completions, prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.04), ("dr_grpo", 0.0), ("bnpo", 0.04), ("dapo", 0.0),
                                            ("dapo", 0.1)])
def test_loss_equals_trl(tokenizer_dir, loss_type, beta, packing):
    import torch

    temperature, eps, eps_high = 0.7, 0.2, 0.28
    trainer, tok = _trl_trainer(tokenizer_dir, loss_type=loss_type, beta=beta, epsilon=eps, epsilon_high=eps_high,
                                temperature=temperature)
    prompts, completions, prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(tok)
    ids, att = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, completion_ids.size(1))
        with trainer.model.disable_adapter():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, completion_ids.size(1))
    g = torch.Generator().manual_seed(2)
    old = current + (torch.rand(current.shape, generator=g) - 0.5) * 0.8  # ratios on both sides of the clip range
    adv = torch.tensor([1.3, -0.7, 0.4, -1.0])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = float(trainer._compute_loss(trainer.model, inputs).detach())

    settings = grpo.Settings(generations=2, max_new_tokens=8, temperature=temperature, epsilon=eps,
                             epsilon_high=eps_high, beta=beta, loss=loss_type)
    base = trainer.model.get_base_model()
    base.set_attn_implementation(attention.register() if packing else "sdpa")
    try:
        logps, mask = grpo.token_logps(trainer.model, prompts, completions, packing=packing, pad_id=tok.pad_token_id,
                                       device="cpu", temperature=temperature)
        loss, clipped, _ = grpo.per_token_loss(logps, old, ref if beta else None, adv, settings)
        ours = float(grpo.reduce_loss(loss, mask, settings, step_completions=4, step_tokens=int(mask.sum()),
                                      step_micro_batches=1).detach())
    finally:
        base.set_attn_implementation("sdpa")
    assert torch.allclose(logps * mask, current * completion_mask, atol=1e-5)
    assert 0 < float((clipped * mask).sum()) < float(mask.sum())  # some ratios are clipped, some are not
    print(f"{loss_type} beta={beta} packing={packing}: ours {ours:.9f} TRL {theirs:.9f} |diff| {abs(ours - theirs):.1e}")
    assert ours == pytest.approx(theirs, abs=TOLERANCE)


def test_advantages_equal_trls_on_the_same_rewards(tokenizer_dir):
    """TRL's own scoring path (_generate_and_score_completions: generation, rewards, advantages) with two weighted
    rewards, one of which has no opinion (None) on some completions; our advantages of the rewards it computed."""
    import torch

    seen: list[list] = []

    def length_reward(completions, **_):
        out = [float(len(c[0]["content"]) % 7) for c in completions]
        seen.append(out)
        return out

    def sometimes(completions, **_):
        out = [None if k % 3 == 0 else float(k % 2) for k in range(len(completions))]
        seen.append(out)
        return out

    trainer, tok = _trl_trainer(tokenizer_dir, [length_reward, sometimes], reward_weights=[1.0, 0.5],
                                num_generations=4)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    out = trainer._generate_and_score_completions(batch)
    per_func = torch.tensor([[float("nan") if v is None else v for v in col] for col in seen]).T
    ours, _ = grpo.advantages(per_func, [1.0, 0.5], 4, "group")
    assert torch.allclose(ours, out["advantages"], atol=1e-6)
    assert float(ours.abs().sum()) > 0


# ------------------------------------------------------------------------------------------- rewards
def _score(configs, completions, references, tmp_path=Path(".")):
    built = rewards.build([recipe_mod.RewardConfig(**c) for c in configs], tmp_path)
    return rewards.score(built, ["p"] * len(completions), completions, references, [[1] * len(c) for c in completions],
                         [f"training row {k}" for k in range(len(completions))])


def test_built_in_rewards():
    out = _score([{"name": "exact_match"}, {"name": "numeric_match"}, {"name": "regex", "pattern": r"-?\d+"},
                  {"name": "json_schema"}, {"name": "length", "max_tokens": 4}],
                 ["71", "The answer is 71.", '{"a": 1}', "x" * 8], ["71", "71", "7", "8"])
    assert out.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, -3.25],
                            [0.0, 0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0, -1.0]]


def test_json_schema_reward_checks_the_schema():
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "required": ["order"], "properties": {"order": {"type": "string"}}}
    out = _score([{"name": "json_schema", "json_schema": schema}], ['{"order": "1"}', '{"order": 1}', "nope"],
                 [None] * 3)
    assert out[:, 0].tolist() == [1.0, 0.0, 0.0]


def _user_module(tmp_path: Path, body: str) -> str:
    name = f"rw_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(body)
    return name


def test_a_user_function_with_trls_signature_and_none(tmp_path):
    name = _user_module(tmp_path, "def f(prompts, completions, reference, **kw):\n"
                                  "    return [None if c == 'skip' else float(len(c[0]['content']) if isinstance(c, list)"
                                  " else len(c)) for c in completions]\n")
    built = rewards.build([recipe_mod.RewardConfig(function=f"{name}:f", conversational=True)], tmp_path)
    out = rewards.score(built, ["p", "p"], ["abc", "de"], ["x", "y"], [[1], [2]], ["row 0", "row 1"])
    assert out[:, 0].tolist() == [3.0, 2.0]


@pytest.mark.parametrize("body,spec,match", [
    ("", "no_such_module_here:f", r"train.rewards.0.function: no_such_module_here:f: no module 'no_such_module_here'"),
    ("def g(prompts, completions, **kw):\n    return [1.0] * len(completions)\n", "MOD:f",
     r"train.rewards.0.function: MOD:f: MOD has no function 'f' \(it has \['g'\]\)"),
])
def test_a_reward_function_that_cannot_be_found_is_named(tmp_path, body, spec, match):
    name = _user_module(tmp_path, body) if body else None
    spec, match = (spec.replace("MOD", name), match.replace("MOD", name)) if name else (spec, match)
    with pytest.raises(UserError, match=match):
        rewards.build([recipe_mod.RewardConfig(function=spec)], tmp_path)


@pytest.mark.parametrize("returns,match", [
    ("raise ValueError('bad row')", r"rw\w+:f raised ValueError: bad row \(scoring training row 0, training row 1\)"),
    ("return [1.0]", r"rw\w+:f returned 1 values for 2 completions"),
    ("return 1.0", r"rw\w+:f returned float for 2 completions"),
    ("return [1.0, 'yes']", r"rw\w+:f returned 'yes' for completion 1 of training row 1"),
    ("return [1.0, float('nan')]", r"rw\w+:f returned nan for completion 1"),
])
def test_a_reward_function_that_misbehaves_is_one_line(tmp_path, returns, match):
    name = _user_module(tmp_path, f"def f(prompts, completions, **kw):\n    {returns}\n")
    built = rewards.build([recipe_mod.RewardConfig(function=f"{name}:f")], tmp_path)
    with pytest.raises(UserError, match=match) as err:
        rewards.score(built, ["p", "p"], ["a", "b"], ["x", "y"], [[1], [2]], ["training row 0", "training row 1"])
    assert "\n" not in str(err.value)


def test_a_reference_reward_on_a_prompt_only_row_names_the_row():
    built = rewards.build([recipe_mod.RewardConfig(name="exact_match")], Path("."))
    with pytest.raises(UserError, match="exact_match compares with the reference, but training row 1 has none"):
        rewards.score(built, ["p", "p"], ["a", "b"], ["a", None], [[1], [2]], ["training row 0", "training row 1"])


def test_recipe_checks_reward_settings():
    with pytest.raises(ValueError, match="give either name"):
        recipe_mod.RewardConfig(name="regex", function="m:f", pattern="x")
    with pytest.raises(ValueError, match="the regex reward needs pattern"):
        recipe_mod.RewardConfig(name="regex")
    with pytest.raises(ValueError, match="max_tokens is a setting of the length reward, not of exact_match"):
        recipe_mod.RewardConfig(name="exact_match", max_tokens=3)
    with pytest.raises(ValueError, match="train.objective grpo needs train.rewards"):
        recipe_mod.TrainConfig(objective="grpo")


def test_prompt_row_is_the_part_before_the_last_trained_span():
    row = rollout.prompt_row([1, 2, 3, 4, 5, 6, 7], [-100, 9, -100, -100, 5, 6, 7], "training row 0")
    assert row.ids == (1, 2, 3, 4) and row.reference_ids == (5, 6, 7)
    only = rollout.prompt_row([1, 2, 3], [-100] * 3, "training row 1")
    assert only.ids == (1, 2, 3) and only.reference_ids is None


# ------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_draws_from_the_softmax_of_the_filtered_scores():
    """Greedy decoding of the scores SeededSampling returns is a draw from softmax(logits / temperature), top-p
    filtered as transformers filters: the frequencies over 4000 streams."""
    import torch

    logits = torch.tensor([0.0, 1.0, 2.0, float("-inf")])
    for temperature, top_p, want in ((1.0, 1.0, torch.softmax(logits, 0)), (0.5, 1.0, torch.softmax(logits / 0.5, 0)),
                                     (1.0, 0.7, torch.tensor([0.0, 0.2689, 0.7311, 0.0]))):
        sampler = rollout.SeededSampling(list(range(4000)), temperature, top_p)
        picks = sampler(None, logits.expand(4000, 4).clone()).argmax(-1)
        got = torch.bincount(picks, minlength=4).float() / 4000
        assert torch.allclose(got, want, atol=0.025), (temperature, top_p, got, want)
        assert float(got[3]) == 0.0 and (top_p == 1.0 or float(got[0]) == 0.0)
    again = rollout.SeededSampling(list(range(4000)), 1.0, 1.0)
    first = rollout.SeededSampling(list(range(4000)), 1.0, 1.0)(None, logits.expand(4000, 4).clone()).argmax(-1)
    assert torch.equal(again(None, logits.expand(4000, 4).clone()).argmax(-1), first)  # a seed decides


def test_a_completion_depends_on_its_seed_not_on_the_rows_batched_beside_it(tokenizer_dir):
    """What a prompt's completions are does not depend on the process or micro-batch that samples them: alone, or
    after a longer prompt (other padding, other rows), the same seeds give the same tokens."""
    from contextlib import nullcontext

    model, tok = tiny_llama(tokenizer_dir)
    settings = grpo.Settings(generations=2, max_new_tokens=8, temperature=1.0)
    a, b = (1, 520, 198, 42, 43), (1, 520, 198) + tuple(range(300, 312))
    seeds_a = rollout.completion_seeds(42, 3, 7, 2)
    kw = dict(n=2, settings=settings, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, device="cpu",
              autocast=nullcontext)
    alone = rollout.generate(model, [a], seeds=seeds_a, **kw)
    beside = rollout.generate(model, [b, a], seeds=rollout.completion_seeds(42, 3, 2, 2) + seeds_a, **kw)
    assert beside[2:] == alone and alone[0] != alone[1]
    assert rollout.generate(model, [a], seeds=rollout.completion_seeds(42, 4, 7, 2), **kw) != alone  # another step
    assert len(set(rollout.completion_seeds(42, 3, 7, 4) + rollout.completion_seeds(42, 3, 8, 4))) == 8


def test_step_statistics_summed_over_processes_equal_one_process():
    """The reward mean and std of a step from per-process sums (NaN: no value) equal those of all its completions
    on one process."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    x[2, 1] = x[7, 1] = float("nan")
    halves = [grpo._moments(x[:5]), grpo._moments(x[5:])]
    means, stds = grpo._from_moments([p + q for p, q in zip(*halves, strict=True)])
    assert means == pytest.approx(torch.nanmean(x, 0).tolist(), abs=1e-12)
    assert stds == pytest.approx([float(grpo.nanstd(x[:, j])) for j in range(3)], abs=1e-6)
    batch = grpo.advantages(x[:8, :1].float(), [1.0], 4, "batch", batch_std=stds[0])[0]
    assert torch.allclose(batch, (x[:8, 0] - x[:8, 0].view(2, 4).mean(1).repeat_interleave(4)).float()
                          / (stds[0] + 1e-4))


# ------------------------------------------------------------------------------ training (golden rewards)
def _rows(n: int, seed: int) -> dict[str, list]:
    """A random prompt (ending with the assistant header of the chat template) and a short reference."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for _ in range(n):
        prompt = [1] + [rng.randint(10, 400) for _ in range(rng.randint(3, 10))] + [1, 520, 198]
        answer = [rng.randint(30, 40)] + [2]
        cols["input_ids"].append(prompt + answer)
        cols["labels"].append([-100] * len(prompt) + answer)
        cols["length"].append(len(prompt) + len(answer))
    return cols


def prepared(tmp: Path, model_dir: Path, *, n_train: int = 16, n_val: int = 4, **train_settings):
    from datasets import Dataset

    settings = {"objective": "grpo", "rewards": [{"name": "regex", "pattern": r".*[A-Z].*"},
                                                 {"name": "length", "max_tokens": 3, "weight": 0.5}],
                "grpo": {"generations": 4, "max_new_tokens": 6, "eval_examples": 4}, **train_settings}
    data = {"name": "g", "seed": 42, "runs_dir": str(tmp / "runs"), "model": {"id": str(model_dir), "dtype": "float32"},
            "train": settings}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "g.yaml").write_text(yaml.safe_dump(data))
    recipe = recipe_mod.load(tmp / "g.yaml")
    tokenized = recipe.run_dir("prepare") / "tokenized"
    for split, n, s in (("train", n_train, 0), ("validation", n_val, 1)):
        Dataset.from_dict(_rows(n, s)).save_to_disk(str(tokenized / split))
    record_prepared(recipe, {s: tokenized / s for s in ("train", "validation")}, {"train": n_train, "validation": n_val})
    return recipe


def _log(recipe) -> list[dict]:
    return [json.loads(x) for x in (recipe.run_dir("train") / "log.jsonl").read_text().splitlines()]


# Rewards of the first 4 steps (4 prompts x 4 completions, lr 1e-2, constant), recorded from this implementation
# (each completion sampled from its own stream, seeded by seed, step, row and completion: training/rollout.py).
GOLDEN_REWARD = [0.25, 0.375, 0.4375, 0.3125]


def test_golden_reward_curve_and_logged_metrics(tmp_path, tiny_model_dir):
    recipe = prepared(tmp_path, tiny_model_dir, max_steps=4, batch_size=4, lr=1e-2, scheduler="constant",
                      warmup_ratio=0.0, log_every=1, eval_every=4, save_every=100)
    summary = train.run(recipe)
    log = _log(recipe)
    steps = [e for e in log if e["loss"] is not None]
    assert [e["reward"] for e in steps] == pytest.approx(GOLDEN_REWARD, abs=1e-6)
    for key in ("reward/regex", "reward/regex/std", "reward/length", "reward_std", "completion_length",
                "clip_fraction", "generation_s", "loss_s"):
        assert key in steps[0], key
    assert summary["objective"] == "grpo" and "val_reward" in summary["validation_reward"]
    assert (recipe.run_dir("train") / "adapter" / "adapter_model.safetensors").exists()


def test_grpo_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """A GRPO run stopped at step 2 of 4 and resumed samples the same rollouts and ends with the same adapter."""
    import torch
    from safetensors.torch import load_file

    settings = dict(max_steps=4, batch_size=2, lr=1e-2, scheduler="constant", log_every=1, eval_every=2,
                    save_every=100, grpo={"generations": 2, "max_new_tokens": 4, "eval_examples": 2, "beta": 0.05,
                                          "iterations": 2})
    whole = prepared(tmp_path / "a", tiny_model_dir, n_train=8, n_val=2, **settings)
    train.run(whole)
    parts = prepared(tmp_path / "b", tiny_model_dir, n_train=8, n_val=2, **settings)
    assert train.run(parts, on_eval=lambda step, val: step == 2)["steps"] == 2
    assert train.run(parts, resume=True)["steps"] == 4
    a = load_file(str(whole.run_dir("train") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(parts.run_dir("train") / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [e["reward"] for e in _log(whole) if e["loss"] is not None] == pytest.approx(
        [e["reward"] for e in _log(parts) if e["loss"] is not None], abs=1e-9)
