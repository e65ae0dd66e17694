#!/usr/bin/env bash
# The training checks that need a CUDA GPU, as one run (CI has no GPU; these tests skip there):
#   1. tests/unit/test_train_cuda.py (QLoRA, 8-bit AdamW, DoRA, full fine-tuning under bf16 autocast, packed ==
#      padded on CUDA, Liger kernels, the out-of-memory error) and tests/unit/test_train.py on CUDA;
#   2. scripts/bench_train.py (with variants: Liger, transformers' sdpa mask, padded) on the GPU with SmolLM2-135M- and SmolLM2-1.7B-shaped models (random weights: the
#      speed of a step does not depend on the values);
#   3. scripts/profile_train.py: where the time of a step goes;
#   4. FSDP2 LoRA and QLoRA through recipes/accelerate/fsdp2.yaml on the GPUs present, peak memory vs `finetune plan --gpus N`.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# On a machine without the project's packages (a bare GPU box with torch only), put the missing wheels in .gpuwhl/
# or unpacked in .gpusite/, and the embedded model's tokenizer/config files (no weights) in .gpu/smollm2-135m/.
set -uo pipefail
out="${1:-${OUT:-/tmp/finetune-gpu-check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpuwhl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/finetune-site .gpuwhl/*.whl || exit 1
  export PYTHONPATH="/tmp/finetune-site:$PWD/.gpusite:$PWD"
fi
base="${FINETUNE_GPU_BASE:-.gpu/smollm2-135m}"
if [ -d "$base" ]; then export FINETUNE_TEST_TOKENIZER="$base"; fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "
import torch, transformers, peft, accelerate, bitsandbytes
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes', bitsandbytes.__version__)
try:
    import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))
except ImportError: print('liger-kernel not installed')
" 2>&1 | grep -v "kernels-community"

echo "== 1. tests on CUDA"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs -s tests/unit/test_train_cuda.py tests/unit/test_train.py \
  2>&1 | grep -v "^$" | tee "$out/pytest.log" | grep -E "passed|failed|error|FAILED|ERROR|^(lora|dora|qlora|full)/|SKIP" 

echo "== 2. bench_train on the GPU"
python3 - "$base" <<'EOF' || exit 1
import json, shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
base = Path(sys.argv[1])
shapes = {"smollm2-135m": {}, "smollm2-1.7b": json.loads(Path("tests/fixtures/configs/HuggingFaceTB--SmolLM2-1.7B-Instruct.json").read_text())}
for name, overrides in shapes.items():
    out = Path("/tmp") / f"random-{name}"
    config = AutoConfig.from_pretrained(base)
    for k, v in overrides.items():
        if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            setattr(config, k, v)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation")):
            shutil.copy(f, out / f.name)
    print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters ->", out)
EOF
V="--variant liger=train.kernels=liger --variant sdpa-mask=model.attn_implementation=sdpa"
timeout 130 python3 scripts/bench_train.py --base /tmp/random-smollm2-1.7b --examples 128 --json "$out/bench-1.7b.json" \
  $V 2>&1 | grep -vE "kernels-community|it/s\]|^\s*$" | tee "$out/bench-1.7b.log"
timeout 140 python3 scripts/bench_train.py --base /tmp/random-smollm2-135m --examples 128 --json "$out/bench-135m.json" \
  $V --variant padded=train.packing=false 2>&1 | grep -vE "kernels-community|it/s\]|^\s*$" | tee "$out/bench-135m.log"

echo "== 3. profile (135M-shaped)"
timeout 60 python3 scripts/profile_train.py /tmp/random-smollm2-135m > "$out/profile-135m.txt" 2>&1; tail -c 300 "$out/profile-135m.txt"

echo "== 4. FSDP2 (recipes/accelerate/fsdp2.yaml) on every GPU here: LoRA and QLoRA, peak memory vs the planner"
# Not yet run on a GPU: written on a CPU-only machine, where tests/integration/test_train_fsdp.py covers the path
# over gloo. A 1-process FSDP2 run is legal on one GPU. QLoRA stores its 4-bit weights as bf16 under FSDP2.
ngpu=$(nvidia-smi --list-gpus | wc -l)
PYTHONPATH="${PYTHONPATH:-$PWD}:$PWD/tests" timeout 40 python3 - "$out/fsdp" <<'EOF2' || exit 1
import sys
from pathlib import Path
from train_fixtures import prepared
out = Path(sys.argv[1])
for method in ("lora", "qlora"):
    prepared(out, Path("/tmp/random-smollm2-135m"), f"fsdp-{method}", n_train=256, n_val=16, method=method,
             max_steps=20, batch_size=8, log_every=5, eval_every=20, save_every=10, model={"dtype": "bfloat16"})
EOF2
for method in lora qlora; do
  timeout 150 python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes "$ngpu" \
    -m finetune train "$out/fsdp/fsdp-$method.yaml" > "$out/fsdp-$method.log" 2>&1; echo "fsdp2 $method exit $?"
  grep -E "FSDP2 over|trained|error" "$out/fsdp-$method.log" | head -5
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('processes','sharding','peak_memory_mb','tokens_per_s','final_val_loss')})" \
    "$out/fsdp/runs/fsdp-$method/train/summary.json"
  python3 -m finetune plan "$out/fsdp/fsdp-$method.yaml" --gpus "$ngpu" 2>&1 | grep -E "^  on .*GPU|    total|launch:" | head -4
done
