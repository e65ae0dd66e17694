"""`finetune plan RECIPE`: will this recipe fit in memory, and what is the cheapest change that makes it fit?

Before an evening of training, the planner estimates the peak memory of a training step from the model's
config.json alone (no weights are downloaded):

  weights      the frozen (or trained) model: bf16/fp16/fp32, or 4-bit NF4 + double-quant constants for QLoRA
  adapter      LoRA/DoRA parameters from the model's layer shapes, r and target modules (kept in fp32 by peft)
  gradients    one per trainable parameter (fp32 for adapters, the weight dtype for full fine-tuning)
  optimizer    AdamW: two fp32 states per trainable parameter; 8-bit AdamW: two 1-byte states
  activations  what autograd keeps for the backward pass at batch_size x max_tokens (worst case: every
               sequence at data.clean.max_tokens), all layers, or one layer plus layer inputs with
               gradient checkpointing
  logits/loss  batch x seq x vocab logits, their fp32 upcast and the log-softmax the loss keeps
  framework    CUDA context and allocator slack on a GPU; interpreter and libraries on a CPU

The per-token activation counts follow the tensors a Llama-style decoder layer saves in transformers with
SDPA attention (eager attention adds the seq x seq probabilities). They were checked against measured peak
memory of a real CPU run (see tests/unit/test_plan.py and the README). The time per 1k examples is an
estimate from FLOPs at an assumed sustained throughput, labelled as such everywhere it is printed.

Components are plain typed functions (``ModelDims.from_config``, ``estimate``, ``suggest``); ``run``
reads a recipe and ``command`` is the CLI.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.errors import UserError

GiB = 1024**3
# A named card (8, 12, 16, 24 "GB") is treated as that many GiB (an "8 GB" card reports 8192 MiB), and we
# keep this share of it as the budget: drivers, a desktop session and fragmentation take the rest.
USABLE_SHARE = 0.95
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context + cuBLAS/cuDNN workspaces, measured ~0.5-1 GiB on recent cards
CUDA_ALLOCATOR_SLACK = 0.08           # PyTorch caching allocator: reserved but unusable fragments
CPU_PROCESS_BYTES = int(0.9 * GiB)     # python + torch + transformers + peft + datasets imported, before the model
# Throughput assumed for "a mid-range GPU" in time estimates (a 12-16 GB RTX 3060/4060 Ti/4070-class card):
# sustained bf16 training FLOP/s including kernel and data-loader overheads. An assumption, not a measurement.
MID_RANGE_GPU_FLOPS = 25e12
QLORA_SLOWDOWN = 1.3  # 4-bit weights are dequantized on every forward and backward matmul


# ------------------------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class ModelDims:
    """The shapes of a decoder-only transformer that decide its memory (read from config.json)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    logit_softcapping: bool = False  # Gemma 2: tanh capping of the final logits and attention scores

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        cfg = config.get("text_config") or config  # multimodal configs nest the language model
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            dims = cls(
                model_type=str(cfg.get("model_type", config.get("model_type", "unknown"))),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                max_position_embeddings=cfg.get("max_position_embeddings"),
                logit_softcapping=bool(cfg.get("final_logit_softcapping")),
            )
        except KeyError as exc:
            raise UserError(
                f"model config: no {exc.args[0]!r} in config.json; the planner reads decoder-only transformer configs "
                "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)"
            ) from None
        return dims

    @property
    def fused_projections(self) -> bool:
        """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (LoRA targets differ)."""
        return self.model_type in ("phi3", "phimoe")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: linear module name -> (in_features, out_features)."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        if self.fused_projections:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        norms_per_layer = 4 if self.model_type.startswith("gemma2") else 2
        return self.num_layers * norms_per_layer * self.hidden_size + self.hidden_size

    @property
    def total_params(self) -> int:
        """Parameter count (biases and q/k norms left out: < 0.1% for the models we ship)."""
        return self.embedding_params + self.lm_head_params + self.num_layers * self.layer_linear_params + self.norm_params

    def lora_targets(self, target_modules: str | list[str]) -> dict[str, tuple[int, int]]:
        """The per-layer linear modules a LoRA target spec adapts ('all-linear' = every linear but lm_head)."""
        shapes = self.linear_shapes()
        if isinstance(target_modules, str):
            if target_modules == "all-linear":
                return shapes
            target_modules = [target_modules]
        chosen = {name: shape for name, shape in shapes.items() if any(name == t or name.endswith(t) for t in target_modules)}
        if not chosen:
            raise UserError(
                f"train.lora.target_modules: none of {target_modules} is a linear layer of this {self.model_type} model; "
                f"its layers have {', '.join(shapes)} (or use 'all-linear')"
            )
        return chosen


# --------------------------------------------------------------------------------------------- estimate
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Settings:
    """The training settings that decide memory (plain values: no recipe object)."""

    method: str = "lora"                  # lora | dora | qlora | full
    lora_r: int = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"              # adamw | adamw_8bit | sgd | adafactor
    weight_dtype: str = "bfloat16"        # of the base weights (compute dtype of the 4-bit layers under QLoRA)
    compute_dtype: str | None = None      # autocast dtype (full fine-tuning over fp32 weights); None: weight_dtype
    device: str = "cuda"                  # cuda | cpu
    attn_implementation: str = "sdpa"     # sdpa | eager | flash_attention_2 | auto
    packed: bool = False                  # padding-free rows with per-example SDPA (finetune train's default)
    logit_fraction: float = 1.0           # share of positions that get logits (packed: only trained positions)
    objective: str = "sft"                # sft | dpo | kto | orpo (extra sequences and forward passes)


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
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits + self.framework

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        return out


def estimate(dims: ModelDims, settings: Settings) -> MemoryEstimate:
    """Peak memory of one training step (forward + backward + optimizer step), by component."""
    s = settings
    notes: list[str] = []
    wbytes = DTYPE_BYTES[s.weight_dtype]
    # activations are in the compute dtype; under QLoRA, peft's prepare_model_for_kbit_training upcasts the
    # embeddings and norms to fp32, so the residual stream and the 4-bit layers' outputs are fp32
    act = 4 if s.method == "qlora" else DTYPE_BYTES[s.compute_dtype or s.weight_dtype]
    tokens = s.batch_size * s.seq_len
    targets = dims.lora_targets(s.target_modules) if s.method != "full" else {}

    # weights
    linear = dims.num_layers * dims.layer_linear_params
    other = dims.total_params - linear  # embeddings, lm_head, norms: never quantized
    if s.method == "qlora":
        # NF4: 4 bits a weight + one absmax per 64 weights; double quantization stores the absmax in 8 bits with
        # one fp32 constant per 256 blocks: 0.5 + 1/64 + 4/(64*256) bytes per weight.
        # The rest (embeddings, lm_head, norms) is upcast to fp32 by prepare_model_for_kbit_training.
        weights = int(linear * (0.5 + 1 / 64 + 4 / (64 * 256))) + other * 4
        # each 4-bit matrix is dequantized to the compute dtype for its matmul: the largest one is transient
        weights += max(a * b for a, b in dims.linear_shapes().values()) * 2
        notes.append("weights: 4-bit NF4 with double quantization; embeddings, lm_head and norms upcast to fp32 "
                     "(peft prepare_model_for_kbit_training)")
    else:
        weights = dims.total_params * wbytes
        if s.compute_dtype and s.compute_dtype != s.weight_dtype:
            # autocast keeps a compute-dtype copy of every weight it casts for the step
            weights += dims.total_params * DTYPE_BYTES[s.compute_dtype]

    # trainable parameters
    if s.method == "full":
        trainable = dims.total_params
        adapter = 0
        grad_bytes = wbytes
    else:
        trainable = dims.num_layers * sum(s.lora_r * (a + b) for a, b in targets.values())
        if s.method == "dora":
            trainable += dims.num_layers * sum(b for _, b in targets.values())  # one magnitude per output feature
        adapter = trainable * 4  # peft keeps adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype)
        grad_bytes = 4
    gradients = trainable * grad_bytes
    optimizer = trainable * {"adamw": 8, "adamw_8bit": 2, "sgd": 0, "adafactor": 4}[s.optimizer]
    if s.method == "full" and s.optimizer == "adamw":
        notes.append("full fine-tuning: AdamW moments in fp32 (8 bytes/param) next to weights and gradients")

    # activations kept for backward, per token
    per_layer = _layer_activation_bytes(dims, targets, s, act)
    if s.gradient_checkpointing:
        # every layer keeps only its input; one layer at a time is recomputed with all its activations
        activations = tokens * (dims.num_layers * act * dims.hidden_size + per_layer)
    else:
        activations = tokens * dims.num_layers * per_layer
    activations += tokens * dims.hidden_size * (act + 4)  # embeddings output, final norm
    if s.method == "dora":
        # DoRA builds the full adapted weight to take its norm: one fp32 matrix at a time
        activations += max(a * b for a, b in targets.values()) * 4

    # logits: lm_head output in the compute dtype, its fp32 upcast for the loss, the log-softmax kept by
    # cross-entropy, and the fp32 gradient of the logits in backward
    upcast = 0 if act == 4 else 4
    per_token_logit = act + upcast + 4 + 4 + (2 * act if dims.logit_softcapping else 0)
    logits = int(tokens * min(1.0, s.logit_fraction)) * dims.vocab_size * per_token_logit

    subtotal = weights + adapter + gradients + optimizer + activations + logits
    if s.device == "cuda":
        framework = CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * subtotal)
    else:
        framework = CPU_PROCESS_BYTES
    return MemoryEstimate(weights=int(weights), adapter=int(adapter), gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(activations), logits=int(logits), framework=int(framework),
                          total_params=dims.total_params, trainable_params=int(trainable), notes=notes)


def _layer_activation_bytes(dims: ModelDims, targets: dict[str, tuple[int, int]], s: Settings, act: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (transformers' Llama-style layer, SDPA attention)."""
    h, i = dims.hidden_size, dims.intermediate_size
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    norms = 2 * (4 * h + act * h)      # RMSNorm upcasts its input to fp32 and keeps it; the normed output feeds the projections
    attention = act * (q + 2 * kv)     # rotated q, k and v, kept by SDPA
    attention += act * q               # attention output (also the o_proj input)
    if s.packed and s.attn_implementation != "flash_attention_2":
        # per-example SDPA over packed rows repeats k and v to every query head and copies the output
        attention += act * (2 * (q - kv) + q)
    mlp = 4 * act * i                  # gate, up, act(gate), act(gate)*up (the down_proj input)
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
    matmul_params = dims.num_layers * dims.layer_linear_params + dims.vocab_size * dims.hidden_size
    # causal attention: QK^T and AV over on average seq/2 positions, per layer
    attention = 2 * 2 * dims.num_layers * (settings.seq_len / 2) * dims.num_heads * dims.head_dim
    forward = 2 * matmul_params + attention
    passes = 3 if settings.method == "full" else 2
    if settings.gradient_checkpointing:
        passes += 1
    flops = forward * passes
    if settings.objective != "sft":
        # per token of an example: pairs train two sequences; DPO/KTO add reference (and KTO mismatched-pair)
        # forward passes without gradients
        from finetune.training.preference import forward_passes

        fp = forward_passes(settings.objective, settings.method)
        flops = fp["sequences"] * (flops + forward * fp["no_grad"])
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


def suggest(dims: ModelDims, settings: Settings, budget_bytes: int) -> list[Suggestion]:
    """Changes that lower memory, ordered by least quality cost, each applied on top of the previous ones,
    stopping at the first combination that fits. Empty when the settings already fit.

    A smaller micro-batch with more accumulation costs no quality (only speed), so at every step the largest
    micro-batch that fits is tried before reaching for a lever that costs quality."""
    if fits(estimate(dims, settings), budget_bytes):
        return []
    levers: list[tuple[str, list[str], Settings]] = []
    cur = settings
    if not cur.gradient_checkpointing:  # no quality cost, ~30% slower
        cur = replace(cur, gradient_checkpointing=True)
        levers.append(("turn on gradient checkpointing (same result, ~30% slower)", ["train.gradient_checkpointing=on"], cur))
    if cur.device == "cuda" and cur.optimizer == "adamw":  # negligible quality cost (bitsandbytes, CUDA only)
        cur = replace(cur, optimizer="adamw_8bit")
        levers.append(("8-bit AdamW states (quality effect usually negligible)", ["train.optimizer=adamw_8bit"], cur))
    if cur.device == "cuda" and cur.method in ("lora", "dora", "full"):  # small quality cost
        overrides = ["train.method=qlora"] + (["train.lora.r=16"] if cur.method == "full" else [])
        cur = replace(cur, method="qlora", lora_r=cur.lora_r if cur.method != "full" else 16)
        levers.append(("QLoRA: 4-bit NF4 base weights (small quality cost)", overrides, cur))
    while cur.seq_len > 256:  # drops or truncates long examples: quality cost depends on the data
        cur = replace(cur, seq_len=cur.seq_len // 2)
        levers.append(("shorter sequences (long examples are dropped or truncated; check `finetune prepare`'s "
                       "length report)", [f"data.clean.max_tokens={cur.seq_len}"], cur))

    steps: list[Suggestion] = []
    for change, overrides, new in [("", [], settings)] + levers:
        if change:
            est = estimate(dims, new)
            steps.append(Suggestion(change, overrides, est.total, fits(est, budget_bytes)))
            if steps[-1].fits:
                return steps
        b = new.batch_size // 2
        while b >= 1:
            smaller = replace(new, batch_size=b, grad_accum=new.grad_accum * new.batch_size // b)
            est = estimate(dims, smaller)
            if fits(est, budget_bytes):
                steps.append(Suggestion(
                    f"micro-batch {b} with grad_accum {smaller.grad_accum} (same effective batch, slower)",
                    [f"train.batch_size={b}", f"train.grad_accum={smaller.grad_accum}"], est.total, True))
                return steps
            b //= 2
    return steps


# ------------------------------------------------------------------------------------------ model config
def load_model_config(model_id: str, revision: str | None = None, *, base_dir: Path | None = None,
                      config_path: str | Path | None = None, gated: bool = False) -> tuple[dict[str, Any], str]:
    """config.json as a dict and where it came from: an explicit file or folder, a local model folder, the
    embedded model, or the Hub (config.json only; honours HF_HUB_OFFLINE)."""
    if config_path is not None:
        p = Path(config_path)
        p = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise UserError(f"--config: {p} not found; give a config.json file or a model folder that has one")
        return _read_json(p), str(p)
    from finetune import models

    if model_id == models.EMBEDDED_MODEL:
        resolved = models.resolve(model_id)
        return _read_json(resolved.path / "config.json"), f"embedded {model_id}"
    local = Path(model_id).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.suffix == ".gguf":
        resolved = models.resolve(str(local))
        return _read_json(resolved.path / "config.json"), str(local)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"model.id: {local} has no config.json")
        return _read_json(local / "config.json"), str(local / "config.json")
    if model_id.count("/") != 1:
        raise UserError(f"model.id: {model_id!r} is not a folder, a .gguf file or a Hub id (org/name)")
    return _hub_config(model_id, revision, gated=gated), f"hub {model_id}" + (f"@{revision}" if revision else "")


def _hub_config(repo_id: str, revision: str | None, *, gated: bool) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    from finetune.models import hub_offline

    offline = hub_offline()
    tail = "Or give the model's config.json with --config PATH."
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=offline)
    except GatedRepoError:
        raise UserError(f"model.id: {repo_id} is license-gated: accept its license on https://huggingface.co/{repo_id} "
                        f"and run `hf auth login` (or set HF_TOKEN). {tail}") from None
    except RepositoryNotFoundError:
        gate = " It is license-gated: accept its license and `hf auth login`." if gated else ""
        raise UserError(f"model.id: no Hub model {repo_id!r} (or no access to it).{gate} {tail}") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserError(f"model.id: {repo_id}'s config.json is not cached and {where}. {tail} "
                        f"({type(exc).__name__})") from None
    return _read_json(Path(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable config.json ({exc})") from None


# -------------------------------------------------------------------------------------------------- device
def detect_budget() -> tuple[int, str, str]:
    """(bytes available, device kind, description): free CUDA memory, else available system RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            name = torch.cuda.get_device_name(0)
            return int(free), "cuda", f"{name} ({free / GiB:.1f} of {total / GiB:.1f} GiB free)"
    except Exception:  # a broken CUDA install must not stop a memory estimate
        pass
    avail = _mem_available()
    return avail, "cpu", f"CPU RAM ({avail / GiB:.1f} GiB available)"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# ---------------------------------------------------------------------------------------------- recipe glue
def settings_for(recipe, device: str, *, gradient_checkpointing: bool | None = None) -> Settings:
    """The memory-relevant settings of a recipe on a device ('cuda' or 'cpu')."""
    from finetune import models

    t = recipe.train
    compute = None
    if recipe.model.dtype != "auto":
        dtype = recipe.model.dtype
    elif t.method == "full":
        # finetune train keeps fp32 master weights for full fine-tuning; on a GPU the maths runs under bf16 autocast
        dtype, compute = "float32", ("bfloat16" if device == "cuda" else None)
    elif device == "cuda":
        dtype = "bfloat16"  # fp16 on pre-Ampere cards: same size
    else:
        dtype = "bfloat16" if models.cpu_has_fast_bf16() else "float32"
    ckpt = {"on": True, "off": False}.get(t.gradient_checkpointing, False) if gradient_checkpointing is None \
        else gradient_checkpointing
    # a micro-batch of pairs holds two sequences per row (chosen and rejected): twice the activations
    sequences = 2 if t.objective in ("dpo", "orpo") else 1
    return Settings(method=t.method, lora_r=t.lora.r, lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules,
                    batch_size=t.batch_size * sequences, grad_accum=t.grad_accum, seq_len=recipe.data.clean.max_tokens,
                    objective=t.objective,
                    gradient_checkpointing=ckpt, optimizer=t.optimizer, weight_dtype=dtype, compute_dtype=compute,
                    device=device, attn_implementation=recipe.model.attn_implementation, packed=t.packing)


def plan_for_budget(dims: ModelDims, settings: Settings, budget_bytes: int, checkpointing_mode: str = "auto") -> dict:
    """Estimate for a budget; with checkpointing 'auto', off when it fits without, else on (what train does)."""
    s = settings
    if checkpointing_mode == "auto":
        s = replace(settings, gradient_checkpointing=False)
        if not fits(estimate(dims, s), budget_bytes):
            s = replace(settings, gradient_checkpointing=True)
    est = estimate(dims, s)
    return {"settings": asdict(s), "estimate": est.as_dict(), "budget": budget_bytes, "fits": fits(est, budget_bytes),
            "suggestions": [asdict(x) for x in suggest(dims, s, budget_bytes)]}


def prepared_stats(recipe) -> dict[str, float] | None:
    """From prepare's tokenized train split (when it has run): mean tokens per example and the 95th percentile
    of the share of an example's positions that are trained (finetune train computes logits only there). None when
prepare has not run or its output is stale for this recipe."""
    from finetune import pipeline

    tokenized = recipe.run_dir("prepare") / "tokenized" / "train"
    if not ((recipe.run_dir("prepare") / "manifest.json").exists() and tokenized.exists()):
        return None
    try:
        if pipeline.why_stale(recipe, pipeline.BY_NAME["prepare"]) is not None:
            return None  # prepared from other data or settings: its lengths say nothing about this recipe
    except UserError:
        return None
    try:
        from datasets import load_from_disk

        ds = load_from_disk(str(tokenized))
        lengths = list(ds["length"])
        fractions = sorted(sum(1 for x in labels if x != -100) / max(1, len(labels)) for labels in ds["labels"])
    except Exception:  # an unreadable prepare output only costs us the measured numbers
        return None
    if not lengths:
        return None
    return {"mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "trained_fraction_p95": fractions[int(0.95 * (len(fractions) - 1))]}


def tokens_per_example(recipe, stats: dict[str, float] | None = None) -> tuple[float, str]:
    """Mean tokens per training example: measured by prepare when it has run, else assumed half of max_tokens."""
    stats = stats if stats is not None else prepared_stats(recipe)
    if stats:
        return stats["mean_tokens"], "measured by prepare"
    return recipe.data.clean.max_tokens / 2, "assumed: half of data.clean.max_tokens"


def run(recipe, *, gpu_gb: float | None = None, config_path: str | Path | None = None,
        cards: list[float] | None = None) -> dict:
    """Plan a recipe for the named card (gpu_gb), else the detected device, plus the card the recipe names."""
    config, source = load_model_config(recipe.model.id, recipe.model.revision, base_dir=recipe.base_dir,
                                       config_path=config_path, gated=recipe.model.gated)
    dims = ModelDims.from_config(config)
    targets: list[tuple[str, str, int]] = []  # (label, device, budget bytes)
    if gpu_gb is not None:
        targets.append((f"{gpu_gb:g} GB GPU", "cuda", int(gpu_gb * GiB * USABLE_SHARE)))
    else:
        budget, device, desc = detect_budget()
        targets.append((f"this machine: {desc}", device, int(budget * (USABLE_SHARE if device == "cuda" else 1))))
    for card in ([recipe.card_gb] if recipe.card_gb and recipe.card_gb != gpu_gb else []) + list(cards or []):
        targets.append((f"{card:g} GB GPU (card_gb)" if card == recipe.card_gb else f"{card:g} GB GPU", "cuda",
                        int(card * GiB * USABLE_SHARE)))
    stats = prepared_stats(recipe)
    mean_tokens, mean_source = tokens_per_example(recipe, stats)
    results = []
    for label, device, budget in targets:
        settings = settings_for(recipe, device)
        if stats and stats["max_tokens"] < settings.seq_len:
            settings = replace(settings, seq_len=int(stats["max_tokens"]))
        if stats and settings.packed:
            settings = replace(settings, logit_fraction=stats["trained_fraction_p95"])
        if device == "cpu" and settings.method == "qlora":
            settings = replace(settings, method="lora")
        r = plan_for_budget(dims, settings, budget, recipe.train.gradient_checkpointing)
        r["target"] = label
        r["device"] = device
        if stats and settings.seq_len < recipe.data.clean.max_tokens:
            r["estimate"]["notes"].append(
                f"sequence length: the longest prepared example ({settings.seq_len} tokens), not data.clean.max_tokens")
        if settings.logit_fraction < 1:
            r["estimate"]["notes"].append(
                f"logits only at trained positions: {settings.logit_fraction:.0%} of a sequence (95th percentile "
                "measured by prepare; packed batches)")
        if device == "cpu" and recipe.train.method == "qlora":
            r["estimate"]["notes"].append("qlora needs a CUDA GPU (bitsandbytes 4-bit): this is the estimate for "
                                          "train.method=lora, what this machine can run")
        results.append(r)
    gpu_settings = settings_for(recipe, "cuda", gradient_checkpointing=any(
        r["settings"]["gradient_checkpointing"] for r in results if r["device"] == "cuda"))
    seconds = seconds_per_1k_examples(dims, replace(gpu_settings, seq_len=int(mean_tokens)), mean_tokens)
    return {
        "recipe": recipe.name,
        "model": recipe.model.id,
        "config_source": source,
        "dims": asdict(dims),
        "total_params": dims.total_params,
        "prepared": stats,
        "results": results,
        "time_estimate": {
            "seconds_per_1k_examples": seconds,
            "tokens_per_example": mean_tokens,
            "tokens_per_example_source": mean_source,
            "assumed_flops_per_second": MID_RANGE_GPU_FLOPS,
            "label": "estimate, not a measurement: assumes a mid-range GPU (RTX 3060/4060 Ti/4070 class) sustaining "
                     f"{MID_RANGE_GPU_FLOPS / 1e12:.0f} TFLOP/s of bf16 training",
        },
    }


# --------------------------------------------------------------------------------------------------- CLI
def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(plan: dict) -> str:
    d = plan["results"][0]["settings"]
    lines = [f"plan for {plan['recipe']}: {plan['model']} ({_count(plan['total_params'])} params; config from "
             f"{plan['config_source']})"]
    method = d["method"] + ("" if d["method"] == "full" else f" r={d['lora_r']} on {d['target_modules']}")
    where = "the longest prepared example" if plan.get("prepared") else "data.clean.max_tokens"
    lines.append(f"  {method}; micro-batch {d['batch_size']} x {d['seq_len']} tokens (worst case: every sequence at "
                 f"{where}), grad_accum {d['grad_accum']}, optimizer {d['optimizer']}")
    for r in plan["results"]:
        e, s = r["estimate"], r["settings"]
        lines.append("")
        lines.append(f"  on {r['target']}  [{s['device']}, weights {s['weight_dtype'] if s['method'] != 'qlora' else 'nf4'}, "
                     f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}]")
        for key in ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "framework"):
            extra = f"  ({_count(e['trainable_params'])} trainable params)" if key == "adapter" and e["trainable_params"] else ""
            lines.append(f"    {key:<12} {_gib(e[key]):>11}{extra}")
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        spare = r["budget"] - e["total"]
        lines.append(f"    {'total':<12} {_gib(e['total']):>11}  of {_gib(r['budget'])} usable -> {verdict}"
                     + (f" ({_gib(spare)} spare)" if r["fits"] else ""))
        for note in e["notes"]:
            lines.append(f"    note: {note}")
        if r["suggestions"]:
            lines.append("    to make it fit, in order of least quality cost (each on top of the previous):")
            for i, sug in enumerate(r["suggestions"], 1):
                lines.append(f"      {i}. {sug['change']}: {' '.join(sug['overrides'])} -> {_gib(sug['total'])}"
                             + ("  FITS" if sug["fits"] else ""))
            if not r["suggestions"][-1]["fits"]:
                lines.append("      still too big: pick a smaller model (see recipes/models/) or a larger card")
    t = plan["time_estimate"]
    secs = t["seconds_per_1k_examples"]
    when = f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"
    lines.append("")
    lines.append(f"  time per 1k examples on a GPU: ~{when} ({t['label']}; {t['tokens_per_example']:.0f} tokens/example, "
                 f"{t['tokens_per_example_source']})")
    return "\n".join(lines)
