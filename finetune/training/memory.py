"""The memory model of a training step: pure functions of a model's shapes and the training settings.

Estimates the peak memory of one training step from the model's config.json alone (no weights, no I/O):

  weights      the frozen (or trained) model: bf16/fp16/fp32, or 4-bit NF4 + double-quant constants for QLoRA
  adapter      LoRA/DoRA parameters from the model's layer shapes, r and target modules (kept in fp32 by peft)
  gradients    one per trainable parameter (fp32 for adapters, the weight dtype for full fine-tuning)
  optimizer    AdamW: two fp32 states per trainable parameter; 8-bit AdamW: two 1-byte states
  activations  what autograd keeps for the backward pass at batch_size x max_tokens (worst case: every
               sequence at data.clean.max_tokens), all layers, or one layer plus layer inputs with
               gradient checkpointing
  logits/loss  the vocabulary projection of one chunk of trained tokens (training/loss.py: chunk x vocab logits,
               their fp32 upcast and the softmax's temporaries) plus what the chunked loss keeps per trained token;
               where the loss cannot be chunked (LoRA on lm_head, an architecture outside loss.HEADS), batch x seq x
               vocab logits, their fp32 upcast, the log-softmax the loss keeps and their gradient
  framework    CUDA context and allocator slack on a GPU; interpreter and libraries on a CPU
  generation   GRPO only: what sampling the rollouts (KV cache, the prompts' prefill) needs beyond the training
               pass's activations, logits and gradients (the two do not overlap: gradients are cleared after each
               optimizer step); usually 0

A GRPO step (training/grpo.py) trains on batch_size x generations sequences, each a prompt (up to
data.clean.max_tokens) and a completion (up to train.grpo.max_new_tokens), with its log-probabilities over the full
vocabulary at the completion tokens (not the chunked loss); ``sft_equivalent`` is that training pass as an SFT batch
(see step_sequences). Before it the same sequences are sampled with the KV cache (``generation``), and with
train.grpo.beta > 0 a reference pass runs without gradients (its transients are below the training pass's; full
fine-tuning keeps a frozen copy of the weights for it, counted in weights).

The model's shapes (ModelDims, every kind of layer and its linear modules) are read from config.json by
finetune/training/model_dims.py. The per-token activation counts follow the tensors a Llama-style decoder layer saves in transformers with
SDPA attention (eager attention adds the seq x seq probabilities). They were checked against measured peak
memory of a real CPU run (see tests/unit/test_plan.py and the README). The time per 1k examples is an
estimate from FLOPs at an assumed sustained throughput.

``finetune plan`` (finetune/plan.py) prints these estimates; ``finetune train`` asks ``fits`` whether to turn
gradient checkpointing on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from finetune import hardware
from finetune.training.model_dims import ModelDims  # noqa: F401  (memory.ModelDims kept for callers)

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, measured ~0.5-1 GiB on recent cards
CUDA_ALLOCATOR_SLACK = 0.08           # PyTorch caching allocator: reserved but unusable fragments
CPU_PROCESS_BYTES = int(0.9 * GiB)     # python + torch + transformers + peft + datasets imported, before the model
# Throughput assumed for "a mid-range GPU" in time estimates (a 12-16 GB RTX 3060/4060 Ti/4070-class card):
# sustained bf16 training FLOP/s including kernel and data-loader overheads. An assumption, not a measurement.
MID_RANGE_GPU_FLOPS = 25e12
QLORA_SLOWDOWN = 1.3  # 4-bit weights are dequantized on every forward and backward matmul


# --------------------------------------------------------------------------------------------- estimate
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Settings:
    """The training settings that decide memory (plain values: no recipe object)."""

    method: str = "lora"                  # lora | dora | qlora | full
    lora_r: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    batch_size: int = 8                   # examples per micro-batch, as train.batch_size counts them (pairs: two
    grad_accum: int = 1                   # sequences each, see sequences_per_example)
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"              # adamw | adamw_8bit | sgd | adafactor
    weight_dtype: str = "bfloat16"        # of the base weights (compute dtype of the 4-bit layers under QLoRA)
    compute_dtype: str | None = None      # autocast dtype (full fine-tuning over fp32 weights); None: weight_dtype
    device: str = "cuda"                  # cuda | cpu
    attn_implementation: str = "sdpa"     # sdpa | eager | flash_attention_2 | auto
    packed: bool = False                  # padding-free rows with per-example SDPA (finetune train's default)
    logit_fraction: float = 1.0           # share of positions that get logits (packed: only trained positions)
    objective: str = "sft"                # sft | dpo | kto | orpo | simpo (extra sequences and forward passes)
    lora_experts: bool = False            # LoRA on the experts' fused tensors too (train.lora.experts)
    processes: int = 1                    # > 1: FSDP2 over that many GPUs (the estimate is per GPU)
    chunked_loss: bool = True             # the loss projects a chunk of tokens at a time (training/loss.py)
    # GRPO (objective "grpo"; seq_len is then the prompt's length): train.grpo's generations (completions per
    # prompt), max_new_tokens (the completion's length), beta > 0 (a reference pass) and iterations
    generations: int = 1
    completion_tokens: int = 0
    reference: bool = False
    iterations: int = 1


@dataclass
class MemoryEstimate:
    """Bytes per component of the peak of one training step, plus counts used to make it."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    framework: int
    total_params: int
    trainable_params: int
    generation: int = 0  # GRPO: the rollouts' peak beyond the training pass's (see the module's docstring)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits
                + self.generation + self.framework)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        return out


def estimate(dims: ModelDims, settings: Settings) -> MemoryEstimate:
    """Peak memory of one training step (forward + backward + optimizer step), by component."""
    if settings.objective == "grpo":
        return _grpo_estimate(dims, settings)
    s = settings
    notes: list[str] = []
    wbytes = DTYPE_BYTES[s.weight_dtype]
    act = _act_bytes(s)
    sequences, seq_len = step_sequences(s)
    tokens = sequences * seq_len
    # per kind of decoder layer (ModelDims.layer_groups): how many, and the modules LoRA adapts; then the adapted
    # modules outside the layers (Gemma 4's per-layer input projection), once
    groups = (dims.lora_target_groups(s.target_modules) if s.method != "full"
              else [(n, {}) for n, _ in dims.layer_groups()])
    adapted = groups + [(1, dims.lora_model_targets(s.target_modules) if s.method != "full" else {})]

    weights = _weight_bytes(dims, s, wbytes, notes)

    # trainable parameters
    if s.method == "full":
        trainable = dims.total_params
        adapter = 0
        grad_bytes = wbytes
    else:
        trainable = sum(n * sum(s.lora_r * (a + b) for a, b in targets.values()) for n, targets in adapted)
        if s.lora_experts and dims.is_moe:
            # peft's target_parameters: per expert, r x (in + out) for gate_up (h -> 2i) and down (i -> h)
            h, i = dims.hidden_size, dims.expert_intermediate_size
            trainable += dims.num_layers * dims.num_experts * s.lora_r * ((h + 2 * i) + (i + h))
        if s.method == "dora":
            # one magnitude per output feature
            trainable += sum(n * sum(b for _, b in targets.values()) for n, targets in adapted)
        adapter = trainable * 4  # peft keeps adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype)
        grad_bytes = 4
    gradients = trainable * grad_bytes
    optimizer = trainable * {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "adafactor": 4}[s.optimizer]
    if s.method == "full" and s.optimizer == "adamw":
        notes.append("full fine-tuning: AdamW moments in fp32 (8 bytes/param) next to weights and gradients")

    # activations kept for backward, per token
    per_layer = [(n, _layer_activation_bytes(dims, targets, s, act)) for n, targets in groups if n]
    if s.gradient_checkpointing:
        # every layer keeps only its input; one layer at a time is recomputed with all its activations
        activations = tokens * (dims.num_layers * act * dims.hidden_size + max(b for _, b in per_layer))
    else:
        activations = tokens * sum(n * b for n, b in per_layer)
    activations += tokens * dims.hidden_size * (act + 4)  # embeddings output, final norm
    activations += tokens * sum((4 * a if act != 4 else 0) + 4 * s.lora_r for a, _ in adapted[-1][1].values())
    if s.method == "dora":
        # DoRA builds the full adapted weight to take its norm: one fp32 matrix at a time
        activations += max(a * b for _, targets in adapted for a, b in targets.values()) * 4

    logits = _logits_bytes(dims, s, act, int(tokens * min(1.0, s.logit_fraction)))

    if s.processes > 1:
        weights, adapter, gradients, optimizer = _sharded(dims, s, weights, adapter, gradients, optimizer, notes)
    subtotal = weights + adapter + gradients + optimizer + activations + logits
    if s.device == "cuda":
        framework = CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * subtotal)
    else:
        framework = CPU_PROCESS_BYTES
    return MemoryEstimate(weights=int(weights), adapter=int(adapter), gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(activations), logits=int(logits), framework=int(framework),
                          total_params=dims.total_params, trainable_params=int(trainable), notes=notes)


def _act_bytes(s: Settings) -> int:
    """Bytes of an activation: the compute dtype; under QLoRA, peft's prepare_model_for_kbit_training upcasts the
    embeddings and norms to fp32, so the residual stream and the 4-bit layers' outputs are fp32."""
    return 4 if s.method == "qlora" else DTYPE_BYTES[s.compute_dtype or s.weight_dtype]


def sequences_per_example(objective: str, generations: int = 1) -> int:
    """Sequences one example of a micro-batch (one unit of train.batch_size) brings: a pair (DPO, ORPO, SimPO) is a
    chosen and a rejected reply, trained side by side; an SFT or KTO row is one; a GRPO prompt brings its
    ``generations`` completions (train.grpo.generations), each trained after the prompt."""
    from finetune.training.preference import PAIRED

    if objective == "grpo":
        return generations
    return 2 if objective in PAIRED else 1


def example_unit(objective: str) -> str:
    """What one unit of train.batch_size is: a pair (DPO, ORPO, SimPO), a prompt (GRPO), else a row."""
    from finetune.training.preference import PAIRED

    return "pair" if objective in PAIRED else "prompt" if objective == "grpo" else "row"


def step_sequences(s: Settings) -> tuple[int, int]:
    """(sequences in a micro-batch, tokens of each at most): the one place that counts them. A GRPO sequence is the
    prompt (seq_len) and its completion (completion_tokens)."""
    grpo = s.objective == "grpo"
    return (s.batch_size * sequences_per_example(s.objective, s.generations),
            s.seq_len + (s.completion_tokens if grpo else 0))


def sft_equivalent(s: Settings) -> Settings:
    """A GRPO step's training pass as the SFT batch of the same sequences: batch_size x generations sequences of
    prompt + completion tokens, the log-probabilities over the full vocabulary (training/grpo.py token_logps, not
    the chunked loss) at the completion tokens (packed: logits_to_keep) or at every position (padded)."""
    sequences, seq_len = step_sequences(s)
    return replace(s, objective="sft", batch_size=sequences, seq_len=seq_len, chunked_loss=False,
                   logit_fraction=s.completion_tokens / seq_len if s.packed else 1.0,
                   generations=1, completion_tokens=0, reference=False, iterations=1)


def _grpo_estimate(dims: ModelDims, s: Settings) -> MemoryEstimate:
    """A GRPO step: the training pass (``sft_equivalent``), a frozen copy of the weights as the reference under
    full fine-tuning with beta > 0, the kept old/reference log-probabilities, and the rollouts' peak beyond the
    training pass (``generation``)."""
    est = estimate(dims, sft_equivalent(s))
    sequences, seq_len = step_sequences(s)
    act = _act_bytes(s)
    notes = [f"GRPO: {s.batch_size} prompt{'s' if s.batch_size != 1 else ''} x {s.generations} completions = "
             f"{sequences} sequences of up to {s.seq_len} + {s.completion_tokens} tokens, log-probabilities over the "
             "full vocabulary at the completion tokens"]
    weights = est.weights
    if s.reference and s.method == "full":
        weights += dims.total_params * DTYPE_BYTES[s.weight_dtype]
        notes.append("GRPO reference (beta > 0): a frozen copy of the weights (full fine-tuning)")
    # old (iterations > 1) and reference (beta > 0) log-probabilities, fp32, kept through the step
    kept = sequences * s.completion_tokens * 4 * ((s.iterations > 1) + s.reference)
    # generation: the KV cache of every sequence; one decoder layer's forward over the prompts (prefill) or one token
    # a sequence (decoding); the last position's logits and the sampler's fp32 copies
    kv = _kv_cache_bytes_per_token(dims, act)
    groups = (dims.lora_target_groups(s.target_modules) if s.method != "full"
              else [(n, {}) for n, _ in dims.layer_groups()])
    padded = replace(s, seq_len=seq_len, packed=False)  # generation runs padded batches with SDPA
    layer = max(_layer_activation_bytes(dims, targets, padded, act) for n, targets in groups if n)
    rollout = max(sequences * s.seq_len * (kv + layer), sequences * (seq_len * kv + layer))
    rollout += sequences * dims.vocab_size * (act + 12)
    generation = max(0, rollout - (est.gradients + est.activations + est.logits))
    notes.append(f"GRPO rollouts: KV cache of {sequences} x {seq_len} tokens, "
                 + ("more than the training pass holds" if generation else "within the training pass's peak"))
    subtotal = weights + est.adapter + est.gradients + est.optimizer + est.activations + kept + est.logits + generation
    framework = (CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * subtotal)) if s.device == "cuda" else est.framework
    return replace(est, weights=int(weights), activations=int(est.activations + kept), generation=int(generation),
                   framework=int(framework), notes=notes + est.notes)


def _kv_cache_bytes_per_token(dims: ModelDims, act: int) -> int:
    """Keys and values one token leaves in the cache: every layer with its own k/v projections (KV-shared and
    recurrent layers keep none per token)."""
    per_token = 0
    for n, shapes in dims.layer_groups():
        if "k_proj" in shapes:
            per_token += n * (shapes["k_proj"][1] + shapes.get("v_proj", shapes["k_proj"])[1])
        elif "qkv_proj" in shapes:
            per_token += n * 2 * dims.num_kv_heads * dims.head_dim
    return per_token * act


def _weight_bytes(dims: ModelDims, s: Settings, wbytes: int, notes: list[str]) -> int:
    """The weights in memory: 4-bit NF4 linear layers and fp32 others under QLoRA (with the largest matrix
    dequantized for its matmul), else every weight in its dtype (plus autocast's copies)."""
    linear = dims.linear_params
    other = dims.total_params - linear  # embeddings, lm_head, norms: never quantized
    if s.method == "qlora":
        # NF4: 4 bits a weight + one absmax per 64 weights; double quantization stores the absmax in 8 bits with
        # one fp32 constant per 256 blocks: 0.5 + 1/64 + 4/(64*256) bytes per weight.
        # The rest (embeddings, lm_head, norms) is upcast to fp32 by prepare_model_for_kbit_training.
        weights = int(linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + other * 4
        if dims.is_moe:
            notes.append("mixture of experts: the experts are fused weight tensors, which bitsandbytes does not "
                         "quantize; under QLoRA they are held in fp32 like the embeddings")
        # each 4-bit matrix is dequantized to the compute dtype for its matmul: the largest one is transient
        everything = [*dims.layer_groups(), (1, dims.lora_model_targets("all-linear"))]
        weights += max(a * b for _, shapes in everything for a, b in shapes.values()) * 2
        notes.append("weights: 4-bit NF4 with double quantization; embeddings, lm_head and norms upcast to fp32 "
                     "(peft prepare_model_for_kbit_training)")
    else:
        weights = dims.total_params * wbytes
        if s.compute_dtype and s.compute_dtype != s.weight_dtype:
            # autocast keeps a compute-dtype copy of every weight it casts for the step
            weights += dims.total_params * DTYPE_BYTES[s.compute_dtype]
    return weights


def _logits_bytes(dims: ModelDims, s: Settings, act: int, trained: int) -> int:
    """The loss's peak at ``trained`` positions with logits."""
    upcast = 0 if act == 4 else 4
    if not s.chunked_loss or (s.processes > 1 and s.method == "full"):  # see training/loss.py
        # lm_head output in the compute dtype, its fp32 upcast for the loss, the log-softmax kept by
        # cross-entropy, and the fp32 gradient of the logits in backward
        per_token_logit = act + upcast + 4 + 4 + (2 * act if dims.logit_softcapping else 0)
        return trained * dims.vocab_size * per_token_logit
    from finetune.training import loss

    # one chunk: the projection in the compute dtype, its fp32 upcast, the exponentials of the log-sum-exp, the
    # softmax (in place) cast back for the backward product; soft-capping's tanh and its derivative
    chunk = min(trained, loss.chunk_tokens(dims.vocab_size))
    per_chunk_logit = act + upcast + 4 + (act if act != 4 else 0) + (8 if dims.logit_softcapping else 0)
    # per trained token: the gathered hidden state and d log p / d hidden (a frozen head), in the compute dtype
    return chunk * dims.vocab_size * per_chunk_logit + trained * dims.hidden_size * 2 * act


def _sharded(dims: ModelDims, s: Settings, weights: int, adapter: int, gradients: int, optimizer: int,
             notes: list[str]) -> tuple[int, int, int, int]:
    """Per GPU under FSDP2 (accelerate's wrapping: a group per decoder layer, the embeddings and head together,
    resharded after use except that tail): 1/N of weights, adapter, gradients and optimizer state, plus what is
    gathered whole at a time: the largest layer twice (the one computing and the one prefetched) and the tail."""
    n = s.processes
    per_weight = (0.5 + 1 / 64) if s.method == "qlora" else DTYPE_BYTES[s.weight_dtype]
    largest_layer = max(sum(a * b for a, b in shapes.values()) for _, shapes in dims.layer_groups())
    other = dims.total_params - dims.linear_params  # embeddings, lm_head, norms (fp32 under QLoRA)
    gathered = int(2 * largest_layer * per_weight + other * (4 if s.method == "qlora" else DTYPE_BYTES[s.weight_dtype]))
    if s.method == "full":  # a layer's whole gradient exists until it is reduce-scattered
        gathered += largest_layer * DTYPE_BYTES[s.weight_dtype]
    notes.append(f"FSDP2 over {n} GPUs (recipes/accelerate/fsdp2.yaml): weights, gradients and optimizer state "
                 f"split {n} ways, plus the largest decoder layer gathered twice and the embeddings/head group whole")
    return weights // n + gathered, adapter // n, gradients // n, optimizer // n


def _layer_activation_bytes(dims: ModelDims, targets: dict[str, tuple[int, int]], s: Settings, act: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (transformers' Llama-style layer, SDPA attention).
    Where the layers differ (ModelDims.layer_groups), each kind is sized with the model's attention and MLP widths
    and its own LoRA targets: Qwen3.5's gated-delta layers as attention layers, Gemma 4's global-attention layers
    with the sliding ones' head size (estimates, not measured)."""
    h, i = dims.hidden_size, dims.intermediate_size
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    norms = 2 * (4 * h + act * h)      # RMSNorm upcasts its input to fp32 and keeps it; the normed output feeds the projections
    attention = act * (q + 2 * kv)     # rotated q, k and v, kept by SDPA
    attention += act * q               # attention output (also the o_proj input)
    if s.packed and s.attn_implementation != "flash_attention_2":
        # per-example SDPA over packed rows repeats k and v to every query head and copies the output
        attention += act * (2 * (q - kv) + q)
    mlp = 4 * act * i                  # gate, up, act(gate), act(gate)*up (the down_proj input)
    if dims.is_moe:  # the same for each expert a token is routed to, plus the router's scores
        mlp = dims.experts_per_token * 4 * act * dims.expert_intermediate_size + 4 * dims.num_experts
    total = norms + attention + mlp
    eager = s.attn_implementation == "eager" or (
        s.attn_implementation == "auto" and dims.logit_softcapping and not s.packed)  # transformers' Gemma 2 default
    if eager:
        # eager attention keeps the seq x seq probabilities (fp32 softmax and its cast), and the tanh capping output
        total += dims.num_heads * s.seq_len * (4 + act + (act if dims.logit_softcapping else 0))
    if s.method == "full":
        total += act * h  # the residual stream copies autograd keeps for the weight gradients of the norms
    # LoRA: peft casts each adapted module's input to the fp32 adapter dtype (a copy per module) and keeps
    # lora_A's output for lora_B's gradient; with dropout, the dropped-out copy and its mask as well
    for a, _b in targets.values():
        if act != 4:
            total += 4 * a
        total += 4 * s.lora_r
        if s.lora_dropout > 0:
            total += 4 * a + a
    return total


# ------------------------------------------------------------------------------------------- throughput
def train_flops_per_token(dims: ModelDims, settings: Settings) -> float:
    """Training FLOPs per token: forward 2N (+ attention), backward 2N for input gradients, +2N for weight gradients
    when the weights train (full), +forward again under gradient checkpointing."""
    active_experts = dims.experts_per_token * 3 * dims.hidden_size * dims.expert_intermediate_size if dims.is_moe else 0
    matmul_params = dims.linear_params + dims.num_layers * active_experts + dims.vocab_size * dims.hidden_size
    # causal attention: QK^T and AV over on average seq/2 positions, per attention layer
    attention = 2 * 2 * (dims.num_layers - dims.recurrent_layers) * (settings.seq_len / 2) * dims.num_heads * dims.head_dim
    forward = 2 * matmul_params + attention
    passes = 3 if settings.method == "full" else 2
    if settings.gradient_checkpointing:
        passes += 1
    flops = forward * passes
    if settings.objective != "sft":
        # per token of an example: pairs train two sequences; DPO/KTO add reference (and KTO mismatched-pair)
        # forward passes without gradients; GRPO trains each prompt's completions (iterations times) after
        # generating them
        from finetune.training.preference import forward_passes

        fp = forward_passes(settings.objective, settings.method, generations=settings.generations,
                            reference=settings.reference, iterations=settings.iterations)
        flops = fp["sequences"] * (fp["with_grad"] * flops + forward * fp["no_grad"])
        if settings.objective == "grpo":  # per prompt token: each sequence is the prompt and its completion
            flops *= (settings.seq_len + settings.completion_tokens) / max(settings.seq_len, 1)
    if settings.method == "qlora":
        flops *= QLORA_SLOWDOWN
    return flops


def seconds_per_1k_examples(dims: ModelDims, settings: Settings, tokens_per_example: float,
                            flops_per_second: float = MID_RANGE_GPU_FLOPS) -> float:
    """Estimated training seconds for 1,000 examples of the given mean length at the given sustained FLOP/s."""
    return 1000 * tokens_per_example * train_flops_per_token(dims, settings) / flops_per_second


# ------------------------------------------------------------------------------------------- suggestions
@dataclass
class Suggestion:
    change: str          # what to change, in words
    overrides: list[str]  # recipe overrides that make the change
    total: int           # estimated peak after this (and every earlier) change
    fits: bool


def fits(est: MemoryEstimate, budget_bytes: int) -> bool:
    return est.total <= budget_bytes


def as_planned(dims: ModelDims, settings: Settings, budget_bytes: int, auto_checkpointing: bool = False
               ) -> tuple[Settings, MemoryEstimate]:
    """The settings a run takes and their estimate: with ``auto_checkpointing`` (train.gradient_checkpointing
    auto), checkpointing off when that fits, else on (what train does); otherwise the settings as given."""
    if auto_checkpointing:
        off = replace(settings, gradient_checkpointing=False)
        est = estimate(dims, off)
        if fits(est, budget_bytes):
            return off, est
        settings = replace(settings, gradient_checkpointing=True)
    return settings, estimate(dims, settings)


def suggest(dims: ModelDims, settings: Settings, budget_bytes: int, *, auto_checkpointing: bool = False
            ) -> list[Suggestion]:
    """Changes that lower memory, ordered by least quality cost, each applied on top of the previous ones,
    stopping at the first combination that fits. Empty when the settings already fit.

    A smaller micro-batch with more accumulation costs no quality (only speed), so at every step the largest
    micro-batch that fits is tried before reaching for a lever that costs quality. Every change is in the units of
    the recipe key it names (``train.batch_size`` counts pairs for DPO, ORPO and SimPO), and its total is what
    planning the recipe with the overrides gives: with ``auto_checkpointing`` (train.gradient_checkpointing auto),
    each estimate is taken as ``as_planned`` takes it, with checkpointing on only when it must be."""
    if fits(as_planned(dims, settings, budget_bytes, auto_checkpointing)[1], budget_bytes):
        return []
    levers: list[tuple[str, list[str], Settings]] = []
    base = replace(settings, gradient_checkpointing=True) if auto_checkpointing else settings
    cur = base
    if not cur.gradient_checkpointing:  # no quality cost, ~30% slower
        cur = replace(cur, gradient_checkpointing=True)
        levers.append(("turn on gradient checkpointing (same result, ~30% slower)", ["train.gradient_checkpointing=on"], cur))
    if cur.device == "cuda" and cur.optimizer == "adamw":  # negligible quality cost (bitsandbytes, CUDA only)
        cur = replace(cur, optimizer="adamw_8bit")
        levers.append(("8-bit AdamW states (quality effect usually negligible)", ["train.optimizer=adamw_8bit"], cur))
    if cur.device == "cuda" and cur.method in ("lora", "dora", "full"):  # small quality cost
        full = cur.method == "full"
        overrides = ["train.method=qlora"] + (["train.lora.r=16"] if full else [])
        # full fine-tuning's fp32 master weights are gone: 4-bit layers compute in the autocast dtype
        cur = replace(cur, method="qlora", lora_r=16 if full else cur.lora_r,
                      weight_dtype=cur.compute_dtype or cur.weight_dtype, compute_dtype=None)
        levers.append(("QLoRA: 4-bit NF4 base weights (small quality cost)", overrides, cur))
    while cur.seq_len > 256:  # drops or truncates long examples: quality cost depends on the data
        cur = replace(cur, seq_len=cur.seq_len // 2)
        levers.append(("shorter sequences (long examples are dropped or truncated; check `finetune prepare`'s "
                       "length report)", [f"data.clean.max_tokens={cur.seq_len}"], cur))

    steps: list[Suggestion] = []
    for change, overrides, new in [("", [], base)] + levers:
        if change:
            est = as_planned(dims, new, budget_bytes, auto_checkpointing)[1]
            steps.append(Suggestion(change, overrides, est.total, fits(est, budget_bytes)))
            if steps[-1].fits:
                return steps
        # the same examples per optimizer step (batch_size x grad_accum), so only divisors of the micro-batch
        for b in sorted((d for d in range(1, new.batch_size) if new.batch_size % d == 0), reverse=True):
            smaller = replace(new, batch_size=b, grad_accum=new.grad_accum * new.batch_size // b)
            est = as_planned(dims, smaller, budget_bytes, auto_checkpointing)[1]
            if fits(est, budget_bytes):
                unit = {"pair": " pair", "prompt": " prompt"}.get(example_unit(new.objective), "")
                unit += "s" if unit and b != 1 else ""
                steps.append(Suggestion(
                    f"micro-batch {b}{unit} with grad_accum {smaller.grad_accum} (same effective batch, slower)",
                    [f"train.batch_size={b}", f"train.grad_accum={smaller.grad_accum}"], est.total, True))
                return steps
    return steps


# ---------------------------------------------------------------------------------------------- recipe glue
def settings_for(recipe, device: str, *, gradient_checkpointing: bool | None = None,
                 cpu_fast_bf16: bool = False) -> Settings:
    """The memory-relevant settings of a recipe on a device ('cuda' or 'cpu'); the one place that reads them
    from a recipe. ``cpu_fast_bf16``: the CPU computes in bf16 natively (``hardware.cpu_has_fast_bf16()``), so a
    CPU run loads the weights in bf16."""
    t = recipe.train
    # fp16 on pre-Ampere cards has bf16's size: the estimate takes bf16 for any GPU
    dtype, compute = hardware.training_dtypes(recipe.model.dtype, t.method, device,
                                            fast_bf16=device == "cuda" or cpu_fast_bf16)
    ckpt = {"on": True, "off": False}.get(t.gradient_checkpointing, False) if gradient_checkpointing is None \
        else gradient_checkpointing
    # LoRA on the output layer: the loss takes the full logits (training/loss.py)
    head_adapted = t.method != "full" and isinstance(t.lora.target_modules, list) and "lm_head" in t.lora.target_modules
    return Settings(chunked_loss=not head_adapted, method=t.method, lora_r=t.lora.r, lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules,
                    batch_size=t.batch_size, grad_accum=t.grad_accum, seq_len=recipe.data.clean.max_tokens,
                    objective=t.objective, lora_experts=t.lora.experts,
                    gradient_checkpointing=ckpt, optimizer=t.optimizer, weight_dtype=dtype, compute_dtype=compute,
                    device=device, attn_implementation=recipe.model.attn_implementation, packed=t.packing,
                    **_grpo_settings(t))


def _grpo_settings(t) -> dict[str, Any]:
    """The GRPO keys that decide memory and time (none for another objective)."""
    if t.objective != "grpo":
        return {}
    g = t.grpo
    return {"generations": g.generations, "completion_tokens": g.max_new_tokens, "reference": g.beta > 0,
            "iterations": g.iterations}


def plan_for_budget(dims: ModelDims, settings: Settings, budget_bytes: int, checkpointing_mode: str = "auto") -> dict:
    """Estimate for a budget; with checkpointing 'auto', off when it fits without, else on (what train does)."""
    auto = checkpointing_mode == "auto"
    s, est = as_planned(dims, settings, budget_bytes, auto)
    return {"settings": asdict(s), "estimate": est.as_dict(), "budget": budget_bytes, "fits": fits(est, budget_bytes),
            "suggestions": [asdict(x) for x in suggest(dims, s, budget_bytes, auto_checkpointing=auto)]}

