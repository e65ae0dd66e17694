"""The memory planner: parameter counts against transformers/peft, monotonic estimates, suggestions, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from finetune import plan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
GiB = plan.GiB

# Published parameter counts (model cards) for the fixture snapshots: a wrong snapshot shows up here.
PUBLISHED_BILLIONS = {
    "meta-llama--Llama-3.1-8B-Instruct": 8.03, "meta-llama--Llama-3.2-1B-Instruct": 1.24,
    "meta-llama--Llama-3.2-3B-Instruct": 3.21, "Qwen--Qwen2.5-0.5B-Instruct": 0.49, "Qwen--Qwen2.5-1.5B-Instruct": 1.54,
    "Qwen--Qwen2.5-7B-Instruct": 7.61, "Qwen--Qwen3-1.7B": 1.72, "Qwen--Qwen3-8B": 8.19,
    "mistralai--Mistral-7B-Instruct-v0.3": 7.25, "google--gemma-2-2b-it": 2.61, "microsoft--Phi-3.5-mini-instruct": 3.82,
    "HuggingFaceTB--SmolLM2-1.7B-Instruct": 1.71, "HuggingFaceTB--SmolLM3-3B": 3.08,
    # Qwen3.5's cards give the language model to one digit (0.8B, 4B); these are its exact count (transformers'
    # Qwen3_5ForCausalLM built from the snapshot, the vision tower and the multi-token-prediction layer left out)
    "Qwen--Qwen3.5-0.8B": 0.75, "Qwen--Qwen3.5-4B": 4.21,
    # Likewise the language model alone, counted by transformers' text class (the cards round, or count the whole
    # checkpoint: Gemma 4 E4B "8B with embeddings")
    "google--gemma-4-E4B-it": 7.46, "mistralai--Ministral-3-8B-Instruct-2512": 8.49,
}


def dims(name: str) -> plan.ModelDims:
    return plan.ModelDims.from_config(json.loads((FIXTURES / f"{name}.json").read_text()))


LLAMA8B = "meta-llama--Llama-3.1-8B-Instruct"


def test_every_fixture_has_a_published_count():
    assert {p.stem for p in FIXTURES.glob("*.json")} == set(PUBLISHED_BILLIONS)
    for name, billions in PUBLISHED_BILLIONS.items():
        assert dims(name).total_params / 1e9 == pytest.approx(billions, abs=0.01), name


@pytest.mark.parametrize("name", [LLAMA8B, "microsoft--Phi-3.5-mini-instruct", "google--gemma-2-2b-it",
                                  "Qwen--Qwen3.5-4B", "google--gemma-4-E4B-it", "mistralai--Ministral-3-8B-Instruct-2512"])
def test_counts_match_transformers_and_peft(name):
    """Total and LoRA-trainable parameters equal those of the real architecture (built on the meta device; of an
    image-text checkpoint, its language model): also where the layers differ, Qwen3.5's hybrid of gated-delta and
    gated-attention layers and Gemma 4's sliding/global, KV-shared layers and per-layer embeddings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((FIXTURES / f"{name}.json").read_text())
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config.get_text_config())
    total = sum(p.numel() for p in model.parameters())
    d = plan.ModelDims.from_config(config)
    assert d.total_params == pytest.approx(total, rel=1e-4)  # biases/q-k norms are left out: < 0.01%
    cases = [(16, "all-linear"), (8, ["q_proj", "v_proj"] if not d.fused_projections else ["qkv_proj"])]
    if d.recurrent_layers:  # modules of the gated-delta layers only
        cases.append((8, ["in_proj_qkv", "out_proj"]))
    if d.model_linear:  # a module outside the layers and one in every layer
        cases.append((4, ["per_layer_model_projection", "down_proj"]))
    for r, targets in cases:
        peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        est = plan.estimate(d, plan.Settings(lora_r=r, target_modules=targets))
        assert est.trainable_params == trainable, (r, targets)
        model = peft_model.unload()


def test_monotonic_in_batch_and_sequence():
    d = dims(LLAMA8B)
    for method in ("lora", "qlora", "full"):
        for ckpt in (False, True):
            base = plan.Settings(method=method, gradient_checkpointing=ckpt, batch_size=1, seq_len=256)
            totals_b = [plan.estimate(d, replace(base, batch_size=b)).total for b in (1, 2, 4, 8)]
            totals_s = [plan.estimate(d, replace(base, seq_len=s)).total for s in (256, 512, 1024, 2048)]
            assert totals_b == sorted(totals_b) and len(set(totals_b)) == 4
            assert totals_s == sorted(totals_s) and len(set(totals_s)) == 4


def test_levers_lower_memory():
    d = dims(LLAMA8B)
    s = plan.Settings(method="lora", batch_size=2, seq_len=1024)
    lora = plan.estimate(d, s)
    qlora = plan.estimate(d, replace(s, method="qlora"))
    assert qlora.total < lora.total
    assert qlora.weights < lora.weights / 1.8  # 4-bit linear layers; embeddings and lm_head upcast to fp32 by peft
    assert qlora.trainable_params == lora.trainable_params
    assert plan.estimate(d, replace(s, gradient_checkpointing=True)).activations < lora.activations / 5
    assert plan.estimate(d, replace(s, optimizer="adamw_8bit")).optimizer == lora.optimizer // 4
    full = plan.estimate(d, replace(s, method="full"))
    assert full.total > lora.total and full.trainable_params == d.total_params
    # double quantization: about 0.127 bits of constants per weight instead of 0.5
    linear = d.num_layers * d.layer_linear_params
    dequantized = max(a * b for a, b in d.linear_shapes().values()) * 2  # one matrix in bf16 for its matmul
    four_bit = qlora.weights - (d.total_params - linear) * 4 - dequantized
    assert linear * 0.5 < four_bit < linear * 0.52


def test_lora_params_follow_rank_and_targets():
    d = dims("Qwen--Qwen2.5-1.5B-Instruct")
    r8 = plan.estimate(d, plan.Settings(lora_r=8)).trainable_params
    r16 = plan.estimate(d, plan.Settings(lora_r=16)).trainable_params
    assert r16 == 2 * r8
    qv = plan.estimate(d, plan.Settings(lora_r=16, target_modules=["q_proj", "v_proj"])).trainable_params
    h, kv = d.hidden_size, d.num_kv_heads * d.head_dim
    assert qv == d.num_layers * 16 * ((h + h) + (h + kv))
    with pytest.raises(plan.UserError, match="qkv_proj"):
        plan.estimate(dims("microsoft--Phi-3.5-mini-instruct"), plan.Settings(target_modules=["q_proj"]))


def test_no_suggestions_when_it_fits_and_ordered_suggestions_when_not():
    d = dims(LLAMA8B)
    s = plan.Settings(method="lora", batch_size=8, seq_len=2048)
    assert plan.suggest(d, s, 10_000 * GiB) == []
    steps = plan.suggest(d, s, int(12 * GiB * plan.USABLE_SHARE))
    assert steps, "an 8B LoRA at 8 x 2048 does not fit 12 GB; the planner must say what to change"
    assert steps[-1].fits and not any(x.fits for x in steps[:-1])
    changes = [x.overrides[0] for x in steps]
    # least quality cost first: checkpointing before 8-bit Adam before QLoRA before shorter sequences
    order = ["train.gradient_checkpointing=on", "train.optimizer=adamw_8bit", "train.method=qlora"]
    seen = [c for c in order if c in changes]
    assert seen == order[: len(seen)] and "train.method=qlora" in changes
    assert all(a.total >= b.total for a, b in zip(steps, steps[1:], strict=False))
    # applying the suggested overrides really gives a fitting estimate
    final = replace(s, gradient_checkpointing=True, optimizer="adamw_8bit", method="qlora")
    for x in steps:
        for o in x.overrides:
            if o.startswith("train.batch_size="):
                final = replace(final, batch_size=int(o.split("=")[1]))
            if o.startswith("data.clean.max_tokens="):
                final = replace(final, seq_len=int(o.split("=")[1]))
    assert plan.fits(plan.estimate(d, final), int(12 * GiB * plan.USABLE_SHARE))


def test_a_hopeless_case_says_so():
    steps = plan.suggest(dims(LLAMA8B), plan.Settings(method="full", batch_size=1, seq_len=256), 2 * GiB)
    assert steps and not steps[-1].fits


def test_time_estimate_scales_with_model_and_method():
    small, big = dims("Qwen--Qwen2.5-0.5B-Instruct"), dims(LLAMA8B)
    s = plan.Settings(seq_len=512)
    t_small = plan.seconds_per_1k_examples(small, s, 256)
    t_big = plan.seconds_per_1k_examples(big, s, 256)
    assert 5 < t_big / t_small < 30
    assert plan.seconds_per_1k_examples(big, replace(s, method="qlora"), 256) > t_big
    assert plan.seconds_per_1k_examples(big, replace(s, gradient_checkpointing=True), 256) > t_big


def test_cli_fits_and_does_not_fit(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {id: meta-llama/Llama-3.1-8B-Instruct, gated: true}\n"
                      "data: {clean: {max_tokens: 1024}}\ntrain: {method: qlora, batch_size: 1}\n")
    config = str(FIXTURES / f"{LLAMA8B}.json")
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "16", "--config", config)
    assert code == 0, out + err
    assert "fits" in out and "8.03B params" in out and "time per 1k examples" in out and "estimate" in out
    code, out, err = cli("plan", str(recipe), "train.method=lora", "train.batch_size=8", "--gpu-gb", "8", "--config", config)
    assert code == 1
    assert "DOES NOT FIT" in out and "train.method=qlora" not in out.split("to make it fit")[0]
    assert "to make it fit" in out
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "16", "--config", config, "--json")
    data = json.loads(out)
    assert data["results"][0]["fits"] is True and data["results"][0]["settings"]["gradient_checkpointing"] is True


def test_config_errors_are_clear(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {id: nobody-here/no-such-model-xyz}\n")
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "8")  # HF_HUB_OFFLINE=1 in tests
    assert code == 2 and "--config" in err and "Traceback" not in err
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "8", "--config", str(tmp_path / "missing.json"))
    assert code == 2 and "not found" in err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "8", "--config", str(bad))
    assert code == 2 and "num_hidden_layers" in err


def test_local_model_folder_config(cli, tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{id: {tiny_model_dir}}}\n")
    code, out, err = cli("plan", str(recipe), "--gpu-gb", "8")
    assert code == 0, err
    assert str(tiny_model_dir) in out and "fits" in out


def test_preference_objectives_count_their_extra_forward_passes():
    """Per token of an example, with LoRA (forward F, training passes 2F): DPO trains two sequences and runs the
    reference on both (2 * 3F), ORPO and SimPO two sequences without a reference (2 * 2F), KTO one sequence plus
    reference and the mismatched pair under policy and reference (2F + 3F)."""
    d = dims(LLAMA8B)
    sft = plan.train_flops_per_token(d, plan.Settings(method="lora", seq_len=512))
    ratio = {obj: plan.train_flops_per_token(d, plan.Settings(method="lora", seq_len=512, objective=obj)) / sft
             for obj in ("dpo", "orpo", "simpo", "kto")}
    assert ratio == pytest.approx({"dpo": 3.0, "orpo": 2.0, "simpo": 2.0, "kto": 2.5})


def test_pairs_double_the_sequences_of_a_micro_batch(tmp_path):
    """train.batch_size counts pairs for DPO, ORPO and SimPO, rows for KTO and prompts for GRPO: the settings keep
    the recipe's count (so a suggested train.batch_size means what the key means), and the estimate takes a pair as
    two sequences (GRPO: test_grpo_counts_every_completion_of_a_step)."""
    from finetune import recipe as recipe_mod

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {id: smollm2-135m-instruct}\ntrain: {batch_size: 4, objective: dpo}\n")
    d = dims(LLAMA8B)
    for objective, sequences in (("dpo", 2), ("simpo", 2), ("orpo", 2), ("kto", 1), ("sft", 1)):
        s = plan.settings_for(recipe_mod.load(path, [f"train.objective={objective}"]), "cuda")
        assert s.batch_size == 4 and plan.sequences_per_example(objective) == sequences
        rows = plan.estimate(d, replace(s, objective="sft", batch_size=4 * sequences))
        assert plan.estimate(d, s).activations == rows.activations, objective


GRPO_RECIPE = ("name: r\nmodel: {id: smollm2-135m-instruct}\ndata: {clean: {max_tokens: 256}}\n"
               "train: {batch_size: 2, objective: grpo, rewards: [{name: exact_match}], gradient_checkpointing: off}\n")


def test_grpo_counts_every_completion_of_a_step(tmp_path):
    """A GRPO step trains batch_size x generations sequences of prompt + completion tokens, its log-probabilities
    over the full vocabulary at the completion tokens: the estimate is the SFT estimate of that batch (full logits at
    that share of the positions), grows with the generations and the completion length, and adds a frozen copy of
    the weights for the reference of full fine-tuning with beta > 0 (an adapter's reference is the base)."""
    from finetune import recipe as recipe_mod
    from finetune.training.memory import DTYPE_BYTES

    path = tmp_path / "r.yaml"
    path.write_text(GRPO_RECIPE)

    def settings(*overrides: str) -> plan.Settings:
        return plan.settings_for(recipe_mod.load(path, list(overrides)), "cuda")

    s = settings("train.grpo.generations=4", "train.grpo.max_new_tokens=64")
    assert (s.batch_size, s.generations, s.seq_len, s.completion_tokens, s.reference) == (2, 4, 256, 64, False)
    assert plan.sequences_per_example("grpo", 4) == 4 and plan.step_sequences(s) == (8, 320)
    for name in (LLAMA8B, "HuggingFaceTB--SmolLM2-1.7B-Instruct", "google--gemma-4-E4B-it"):
        d = dims(name)
        for packed in (False, True):
            grpo = plan.estimate(d, replace(s, packed=packed))
            sft = plan.estimate(d, replace(s, packed=packed, objective="sft", batch_size=8, seq_len=320,
                                           chunked_loss=False, logit_fraction=64 / 320 if packed else 1.0))
            assert grpo.generation == 0, name  # the training pass holds more than the rollouts' KV cache
            assert grpo.total == sft.total, (name, packed)
            assert (grpo.activations, grpo.logits) == (sft.activations, sft.logits)
        totals = [plan.estimate(d, settings(f"train.grpo.generations={g}")).total for g in (2, 4, 8)]
        assert totals == sorted(set(totals)), name
        totals = [plan.estimate(d, settings(f"train.grpo.max_new_tokens={n}")).total for n in (16, 64, 256)]
        assert totals == sorted(set(totals)), name
        # one prompt's sequences counted once: four times the generations is four times the sequences
        assert (plan.estimate(d, settings("train.grpo.generations=8")).activations
                == plan.estimate(d, settings("train.grpo.generations=2", "train.batch_size=8")).activations)
    d = dims(LLAMA8B)
    full = settings("train.method=full")
    assert (plan.estimate(d, replace(full, reference=True)).weights
            == plan.estimate(d, full).weights + d.total_params * DTYPE_BYTES[full.weight_dtype])
    lora = settings("train.grpo.beta=0.04")
    assert lora.reference and plan.estimate(d, lora).weights == plan.estimate(d, replace(lora, reference=False)).weights


def test_grpo_rollouts_count_the_kv_cache_beyond_the_training_pass():
    """Long prompts, short completions and gradient checkpointing on a model whose every head has its own keys and
    values (SmolLM2-1.7B): the rollouts' KV cache and the prompts' prefill outgrow the training pass, and the
    estimate holds the difference; without checkpointing the training pass keeps every layer's keys and values
    itself, and the rollouts add nothing."""
    d = dims("HuggingFaceTB--SmolLM2-1.7B-Instruct")
    assert d.num_kv_heads == d.num_heads
    s = plan.Settings(method="lora", objective="grpo", batch_size=2, generations=8, seq_len=4096,
                      completion_tokens=16, gradient_checkpointing=True, packed=True)
    est = plan.estimate(d, s)
    rollout_kv = 2 * 8 * (4096 + 16) * 2 * d.num_layers * d.num_kv_heads * d.head_dim * 2  # bf16 keys and values
    assert est.generation > 0
    assert est.gradients + est.activations + est.logits + est.generation > rollout_kv
    assert plan.estimate(d, replace(s, gradient_checkpointing=False)).generation == 0


def test_grpo_time_counts_generations_and_completions():
    """Per prompt token: the completions train after the prompt (and are generated first), iterations repeat the
    training passes, beta > 0 adds a reference pass."""
    d = dims(LLAMA8B)
    s = plan.Settings(method="lora", seq_len=100, objective="grpo", generations=4, completion_tokens=100)
    one = plan.train_flops_per_token(d, s)
    assert plan.train_flops_per_token(d, replace(s, generations=8)) == pytest.approx(2 * one)
    assert plan.train_flops_per_token(d, replace(s, completion_tokens=300)) == pytest.approx(2 * one)
    assert plan.train_flops_per_token(d, replace(s, reference=True)) > one
    with_reference = plan.train_flops_per_token(d, replace(s, reference=True))
    assert plan.train_flops_per_token(d, replace(s, iterations=2)) > with_reference


def test_an_omitted_tie_takes_the_architectures_default():
    """SmolLM3's config.json has no tie_word_embeddings; transformers ties its embeddings by default, and so does the
    planner (3.08B as published, not 3.34B with a second 128k x 2048 output layer)."""
    config = json.loads((FIXTURES / "HuggingFaceTB--SmolLM3-3B.json").read_text())
    assert "tie_word_embeddings" not in config or config["tie_word_embeddings"] is None
    config.pop("tie_word_embeddings", None)
    assert plan.ModelDims.from_config(config).tie_word_embeddings
    assert not plan.ModelDims.from_config({**config, "tie_word_embeddings": False}).tie_word_embeddings


@pytest.mark.parametrize("layers,experts,total,active", [(24, 32, 20.9, 3.6), (36, 128, 116.8, 5.1)])
def test_mixture_of_experts_counts_every_expert_and_the_active_ones(layers, experts, total, active):
    """gpt-oss-20b / -120b (transformers' GptOssConfig with the published layer and expert counts): total and active
    parameters as the model cards give them (21B / 3.6B, 117B / 5.1B). Every expert is in memory: QLoRA cannot
    shrink the fused expert tensors (bitsandbytes quantizes linear layers), so gpt-oss-20b does not fit 24 GB, and
    the LoRA targets are the attention projections only (all-linear does not reach the experts)."""
    from transformers import GptOssConfig

    d = plan.ModelDims.from_config(GptOssConfig(num_hidden_layers=layers, num_local_experts=experts).to_dict())
    assert d.is_moe and d.total_params / 1e9 == pytest.approx(total, abs=0.1)
    assert d.active_params / 1e9 == pytest.approx(active, abs=0.05)
    assert set(d.lora_targets("all-linear")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    est = plan.estimate(d, plan.Settings(method="qlora", batch_size=1, seq_len=1024, gradient_checkpointing=True))
    assert est.total > 24 * GiB and any("experts" in n for n in est.notes)
    dense_flops = plan.train_flops_per_token(d, plan.Settings(method="lora", seq_len=1024))
    assert dense_flops < 2 * 3 * d.total_params  # compute follows the active experts, not all of them


# -------------------------------------------------------------------- suggestions, applied to the recipe
SUGGESTION_CASES = [
    # the shipped recipes on the embedded 135M model (SFT, DPO pairs, KTO rows, GRPO prompts): small cards
    *[("quickstart.yaml", (), gb) for gb in (1.0, 1.5)],
    *[("preference-dpo.yaml", (), gb) for gb in (1.0, 1.5, 1.75)],
    *[("preference-kto.yaml", (), gb) for gb in (1.0, 1.5)],
    *[("grpo.yaml", (), gb) for gb in (1.0, 1.5)],
    # checkpointing off in the recipe: the first suggestion turns it on (train.gradient_checkpointing=on, text)
    ("quickstart.yaml", ("train.gradient_checkpointing=off",), 1.5),
    ("preference-dpo.yaml", ("train.gradient_checkpointing=off",), 1.5),
    *[("grpo.yaml", ("train.gradient_checkpointing=off",), gb) for gb in (1.5, 2.0)],
    # an 8B model: pairs that need a smaller micro-batch after QLoRA, a batch of 6 pairs (divisors only), full
    # fine-tuning that becomes QLoRA (where checkpointing can go off again under `auto`)
    ("models/llama-3.1-8b-instruct-lora-24gb.yaml", ("train.objective=dpo",), 11.5),
    ("models/llama-3.1-8b-instruct-lora-24gb.yaml", ("train.objective=simpo", "train.batch_size=6"), 28.5),
    ("models/gemma-2-2b-it-lora-16gb.yaml", ("train.method=full",), 21.0),
    ("models/qwen3.5-4b-lora-16gb.yaml", ("train.method=full", "train.objective=orpo"), 7.0),
]


@pytest.mark.parametrize("name,extra,gb", SUGGESTION_CASES,
                         ids=[" ".join([name, *extra, f"{gb:g}GB"]) for name, extra, gb in SUGGESTION_CASES])
def test_suggestions_give_the_estimate_they_print_when_applied(repo_root, tmp_path, name, extra, gb):
    """Every suggestion, its overrides (and those of the suggestions before it) given to the recipe as a user gives
    them and planned again the way `finetune plan` plans, gives the total it printed and fits when it said so; a
    smaller micro-batch keeps the examples per optimizer step (pairs for DPO, ORPO and SimPO)."""
    from finetune import recipe as recipe_mod

    path = repo_root / "recipes" / name
    given = [f"runs_dir={tmp_path}", *extra]  # no prepared data: the same lengths before and after
    recipe = recipe_mod.load(path, given)
    first = plan.run(recipe, gpu_gb=gb)["results"][0]
    suggestions = first["suggestions"]
    assert suggestions and not first["fits"], (name, extra, gb)
    if "train.gradient_checkpointing=off" in extra:
        assert suggestions[0]["overrides"] == ["train.gradient_checkpointing=on"]
    applied: list[str] = []
    for sug in suggestions:
        applied += sug["overrides"]
        again = recipe_mod.load(path, given + applied)
        result = plan.run(again, gpu_gb=gb)["results"][0]
        assert (result["estimate"]["total"], result["fits"]) == (sug["total"], sug["fits"]), (sug, applied)
        assert (again.train.batch_size * again.train.grad_accum
                == recipe.train.batch_size * recipe.train.grad_accum), applied
    assert suggestions[-1]["fits"] or gb == 1.0  # 1 GB: too small for the 135M model whatever the change


@pytest.mark.parametrize("name,gb", [("quickstart.yaml", 1.5), ("grpo.yaml", 1.5), ("grpo.yaml", 2.0),
                                     ("preference-dpo.yaml", 1.5)])
def test_every_suggested_override_pastes_into_the_command_line(cli, repo_root, tmp_path, name, gb):
    """The overrides `finetune plan` prints, pasted after the recipe as a user pastes them (text through the CLI's
    KEY=VALUE parsing: `train.gradient_checkpointing=on` is the text "on", not a boolean), plan again without an
    error, and the last of them fits."""
    recipe = str(repo_root / "recipes" / name)
    given = [f"runs_dir={tmp_path}", "train.gradient_checkpointing=off"]
    code, out, err = cli("plan", recipe, *given, "--gpu-gb", str(gb), "--json")
    assert code == 1, out + err
    suggestions = json.loads(out)["results"][0]["suggestions"]
    assert suggestions[0]["overrides"] == ["train.gradient_checkpointing=on"]
    pasted = list(given)
    for sug in suggestions:
        pasted += sug["overrides"]
        code, out, err = cli("plan", recipe, *pasted, "--gpu-gb", str(gb), "--json")
        assert code in (0, 1) and not err.strip().startswith("error"), (pasted, err)
        result = json.loads(out)["results"][0]
        assert result["estimate"]["total"] == sug["total"], pasted
    assert code == 0 and result["fits"], pasted
