"""The chunked loss (finetune/training/loss.py) equals the full-logits computation: loss and gradients, packed and
padded rows with masked labels, a trained and a frozen output layer, every family's head (the family matrix's twin
configs: Gemma's final soft-capping, Granite's division of the logits, tied embeddings) plus Cohere's logit scale,
and the preference objectives' per-sequence log-probabilities.

Models are the real transformers classes with tiny random configs, in float64 where the comparison is to 1e-9; the
chunk is made small so that every batch spans several chunks.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from finetune.training import batching, loss, preference, steps

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import twins  # noqa: E402

VOCAB = 320
CHUNK_LOGITS = 7 * VOCAB  # 7 tokens a chunk
SHIPPED_CHUNK_LOGITS = loss.CHUNK_LOGITS


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_LOGITS", CHUNK_LOGITS)


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randint(3, VOCAB - 1) for _ in range(n)]
        cut = rng.randint(1, n - 2)  # a prompt (not trained), then the answer
        out.append((ids, [-100] * cut + ids[cut:]))
    return out


def _model(arch: str, settings: dict, dtype=None, attn: str = "eager"):
    import torch
    import transformers

    cls = getattr(transformers, arch)
    settings = {**settings, "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if "vocab_size_per_layer_input" in settings:
        settings["vocab_size_per_layer_input"] = VOCAB
    config = cls.config_class(**settings)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = cls(config).to(dtype or torch.float64)
    model.config.use_cache = False
    with torch.no_grad():  # logits spread wide enough for the soft-capping and the scale to matter
        model.get_output_embeddings().weight.mul_(40.0)
    return model.train()


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batch, chunked: bool):
    model.zero_grad()
    value = steps.forward_loss_sum(model, batch, chunked=chunked)
    value.backward()
    return value.detach(), _grads(model)


def _assert_grads(got: dict, want: dict, tol: float = 1e-6) -> None:
    """Every gradient within ``tol`` of its tensor's largest value. Not tighter in float64: Gemma 3/4's norms compute
    in fp32 even in a float64 model, so a float64 difference of 1e-16 upstream can flip an fp32 rounding there."""
    import torch

    assert got.keys() == want.keys() and want
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=tol, atol=tol * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _assert_same(model, batch):
    """float64: loss to 1e-9, gradients to 1e-6; fp32 (gpt-oss: its experts' grouped matmul has no float64): loss to
    1e-6, gradients to 1e-5."""
    import torch

    full, full_grads = _loss_and_grads(model, batch, chunked=False)
    chunked, chunked_grads = _loss_and_grads(model, batch, chunked=True)
    wide = next(model.parameters()).dtype == torch.float64
    torch.testing.assert_close(chunked, full, rtol=1e-9 if wide else 1e-6, atol=0)
    _assert_grads(chunked_grads, full_grads, 1e-6 if wide else 1e-5)


# one family per transformers class (the head is the class's): Llama, Qwen2/3/3.5, SmolLM3, Phi-3, Mistral,
# Ministral 3, Gemma 2/3/4, gpt-oss, Granite 4, LFM2
FAMILIES = sorted({f.arch: name for name, f in sorted(twins.FAMILIES.items(), reverse=True)}.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_head_gives_the_full_logits_loss_and_gradients(family):
    """Full fine-tuning (the head trains: its gradient is recomputed chunk by chunk). Rows of one length: transformers'
    float64 eager attention gives NaN on a padded row under a sliding window, in both computations."""
    import torch

    f = twins.FAMILIES[family]
    model = _model(f.arch, {**twins.TINY, **f.config}, dtype=torch.float32 if family == "gpt-oss" else None)
    head = loss.head_of(model)
    assert head is not None, f"{f.arch} falls back to the full logits"
    assert head.softcap == f.config.get("final_logit_softcapping")
    assert head.divide == f.config.get("logits_scaling")
    _assert_same(model, batching.collate_padded(_examples([23, 23, 23], seed=1), pad_id=0))


@pytest.mark.parametrize("arch,extra,kind", [
    ("CohereForCausalLM", {"logit_scale": 0.3, "num_hidden_layers": 1}, "multiply"),
    ("GraniteForCausalLM", {"logits_scaling": 4.0, "num_hidden_layers": 1}, "divide"),
])
def test_scaled_heads(arch, extra, kind):
    model = _model(arch, {**twins.TINY, **extra})
    head = loss.head_of(model)
    assert getattr(head, kind) == pytest.approx(extra.get("logit_scale", extra.get("logits_scaling")))
    _assert_same(model, batching.collate_padded(_examples([15, 23]), pad_id=0))


@pytest.mark.parametrize("packed", [True, False])
def test_frozen_head_under_lora_packed_and_padded(packed):
    """LoRA: the head is frozen, so the forward pass keeps d log p / d hidden and backward multiplies by it."""
    from peft import LoraConfig, get_peft_model

    from finetune.training import attention

    f = twins.FAMILIES["gemma2" if packed else "llama3.2"]  # soft-capped, tied embeddings; padding, untied
    model = _model(f.arch, {**twins.TINY, **f.config}, attn=attention.register() if packed else "eager")
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.to(next(model.parameters()).dtype)
    assert loss.head_of(model) is not None
    examples = _examples([17, 30, 8, 12], seed=2)
    batch = batching.collate_packed(examples) if packed else batching.collate_padded(examples, pad_id=0)
    _assert_same(model, batch)


def test_an_adapted_head_takes_the_full_logits():
    """LoRA on lm_head: peft's layer is not a plain Linear, so the loss is the full-logits one, unchanged."""
    from peft import LoraConfig, get_peft_model

    f = twins.FAMILIES["qwen3"]
    model = get_peft_model(_model(f.arch, {**twins.TINY, **f.config}),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    assert loss.head_of(model) is None
    _assert_same(model, batching.collate_padded(_examples([12, 20]), pad_id=0))


def test_the_output_layer_never_sees_a_position():
    """The logits are never built whole: the head's own call gets no position; the loss sums chunk by chunk."""
    import torch

    f = twins.FAMILIES["llama3.2"]
    model = _model(f.arch, {**twins.TINY, **f.config})
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    examples = _examples([40, 33], seed=4)
    steps.forward_loss_sum(model, batching.collate_padded(examples, pad_id=0)).backward()
    assert shapes == [(2, 0, VOCAB)]
    assert loss.chunk_tokens(VOCAB) == 7
    # the full-logits path does build them: the comparison above is not between two identical calls
    shapes.clear()
    with torch.no_grad():
        steps.forward_loss_sum(model, batching.collate_padded(examples, pad_id=0), chunked=False)
    assert shapes == [(2, 40, VOCAB)]


def test_no_trained_token_still_reaches_every_parameter():
    """A packed micro-batch without a trained token (data-parallel filler): loss 0, a zero gradient everywhere."""
    import torch

    f = twins.FAMILIES["smollm2"]
    model = _model(f.arch, {**twins.TINY, **f.config}, attn="eager")
    ids = [5, 6, 7, 8, 9]
    batch = batching.collate_padded([(ids, [-100] * 5)], pad_id=0)
    value, grads = _loss_and_grads(model, batch, chunked=True)
    assert float(value) == 0.0
    assert len(grads) == len([p for p in model.parameters() if p.requires_grad])
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_preference_log_probabilities_and_their_gradients():
    """sequence_logps (DPO/KTO/ORPO/SimPO) through the chunks: per-sequence sums and counts, and the gradient of a
    weighted sum (each sequence its own weight, as a preference loss has)."""
    import torch

    from finetune.training import attention

    seqs = _examples([14, 22, 9, 17], seed=3)
    weights = torch.tensor([0.7, -1.3, 2.0, -0.4], dtype=torch.float64)
    for packing in (True, False):
        f = twins.FAMILIES["gemma2" if packing else "qwen2.5"]
        model = _model(f.arch, {**twins.TINY, **f.config}, attn=attention.register() if packing else "eager")
        out = {}
        for chunked in (True, False):
            model.zero_grad()
            if chunked:
                sums, counts = preference.sequence_logps(model, seqs, packing=packing, pad_id=0, device="cpu")
            else:  # the same through the full logits (loss.trained_logps is what sequence_logps calls)
                with _full_logits(model):
                    sums, counts = preference.sequence_logps(model, seqs, packing=packing, pad_id=0, device="cpu")
            (sums * weights).sum().backward()
            out[chunked] = (sums.detach(), counts, _grads(model))
        torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-9, atol=0)
        assert out[True][1].tolist() == [sum(x != -100 for x in lab[1:]) for _, lab in seqs]
        _assert_grads(out[True][2], out[False][2])


def _full_logits(model):
    """A context in which ``loss.head_of`` finds no chunkable head for this model (the full-logits path)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved = loss.head_of
        loss.head_of = lambda m: None if m is model else saved(m)
        try:
            yield
        finally:
            loss.head_of = saved

    return ctx()


def test_bias_and_bf16_autocast():
    """A head with a bias (none of the families has one) through the Function directly; bf16 autocast within
    bf16 rounding of the full logits."""
    import torch

    torch.manual_seed(1)
    linear = torch.nn.Linear(16, VOCAB, bias=True, dtype=torch.float64)
    hidden = torch.randn(2, 19, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 19))
    targets[0, :5] = -100
    for softcap in (None, 2.5):
        head = loss.Head(linear, softcap=softcap)
        results = []
        for chunked in (True, False):
            linear.zero_grad()
            hidden.grad = None
            if chunked:
                logps = loss._chunked_logps(hidden, targets, head)
            else:
                logits = linear(hidden)
                logits = logits if softcap is None else torch.tanh(logits / softcap) * softcap
                logps = loss.full_logps(logits, targets)
            (logps * torch.linspace(-1, 1, logps.numel(), dtype=logps.dtype)).sum().backward()
            results.append([logps.detach(), hidden.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

    f = twins.FAMILIES["gemma2"]
    model = _model(f.arch, {**twins.TINY, **f.config}, dtype=torch.bfloat16)
    batch = batching.collate_padded(_examples([21, 21]), pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, full_grads = _loss_and_grads(model, batch, chunked=False)
        chunked, chunked_grads = _loss_and_grads(model, batch, chunked=True)
    torch.testing.assert_close(chunked, full, rtol=2e-2, atol=0)
    g_full, g_chunked = full_grads["model.embed_tokens.weight"].float(), chunked_grads["model.embed_tokens.weight"].float()
    assert torch.nn.functional.cosine_similarity(g_full.flatten(), g_chunked.flatten(), dim=0) > 0.99


def test_the_planner_counts_one_chunk_of_logits(monkeypatch):
    """memory.estimate: the loss's share at 262k vocabulary and 2k trained tokens is one chunk's logits, not 2k
    tokens' (and the full logits where the loss is not chunked); every model of the planner's snapshots is chunked."""
    import json

    from finetune.training import memory

    monkeypatch.setattr(loss, "CHUNK_LOGITS", SHIPPED_CHUNK_LOGITS)
    configs = REPO / "tests" / "fixtures" / "configs"
    for path in configs.glob("*.json"):
        assert loss.chunkable_architecture(json.loads(path.read_text()).get("architectures")), path.name
    assert not loss.chunkable_architecture(["SomeRemoteCodeForCausalLM"])
    dims = memory.ModelDims.from_config(json.loads((configs / "google--gemma-4-E4B-it.json").read_text()))
    assert dims.vocab_size == 262144
    settings = memory.Settings(batch_size=1, seq_len=2048, weight_dtype="bfloat16")
    full = memory.estimate(dims, memory.Settings(**{**settings.__dict__, "chunked_loss": False})).logits
    chunked = memory.estimate(dims, settings).logits
    per_logit = 2 + 4 + 4 + 2 + (8 if dims.logit_softcapping else 0)  # see memory._logits_bytes
    assert chunked == 128 * 262144 * per_logit + 2048 * dims.hidden_size * 2 * 2  # 128 tokens a chunk
    assert full >= 2048 * 262144 * 14 and chunked < full / 10


def test_liger_fused_linear_cross_entropy_on_cuda():
    """On CUDA with liger-kernel installed, the SFT loss is Liger's fused linear cross-entropy: the same loss and
    gradients as the chunked computation (soft-capped Gemma 2 head, fp32). Skipped elsewhere, which includes CI."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    pytest.importorskip("liger_kernel")
    f = twins.FAMILIES["gemma2"]
    model = _model(f.arch, {**twins.TINY, **f.config}, dtype=torch.float32).cuda()
    batch = {k: v.cuda() for k, v in batching.collate_padded(_examples([21, 21, 21]), pad_id=0).items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    results = []
    for fused in (True, False):
        model.zero_grad()
        value = (loss.nll_sum(model, inputs, targets) if fused
                 else -loss.trained_logps(model, inputs, targets).sum())
        value.backward()
        results.append((value.detach(), _grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    _assert_grads(results[0][1], results[1][1], 1e-4)
