"""What distributed training refuses, each as one line with the way out (exit 2 through the CLI): DeepSpeed and
FSDP version 1, FSDP2 settings that cannot work together, a resumed run whose process count cannot split its steps
or needs another grad_accum. Real training in 2 processes: tests/integration/test_train_ddp.py (DDP) and
tests/integration/test_train_fsdp.py (FSDP2)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_fixtures import prepared

from finetune.errors import UserError
from finetune.training import checkpoint as ckpt
from finetune.training import sharded


@pytest.fixture(autouse=True)
def _launcher_environment(monkeypatch):
    """accelerate's plugin writes FSDP_CPU_RAM_EFFICIENT_LOADING into the environment when given it: undone."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def _fsdp_accelerator(**plugin_kwargs):
    """An accelerator as train sees it under an FSDP2 launch: the real plugin accelerate builds from the config."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=plugin_kwargs.pop("fsdp_version", 2), **plugin_kwargs)
    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=plugin.fsdp_version == 2,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def _recipe(**train):
    from finetune import recipe as recipe_mod

    return recipe_mod.Recipe.model_validate({"name": "t", "model": {"id": "x"}, "train": train})


def test_deepspeed_and_fsdp1_are_refused_naming_the_fsdp2_config(monkeypatch):
    from accelerate.utils import DistributedType

    for kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(UserError) as exc:
            sharded.refuse_unsupported(SimpleNamespace(distributed_type=kind))
        assert "is not supported" in _one_line(exc) and sharded.CONFIG in str(exc.value)
    with pytest.raises(UserError) as exc:
        sharded.refuse_unsupported(_fsdp_accelerator(fsdp_version=1))
    assert "fsdp_version 1" in _one_line(exc) and "fsdp_version: 2" in str(exc.value)
    # what the launcher sets on a CPU machine, where accelerate itself stays MULTI_CPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version 1"):
        sharded.refuse_unsupported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setenv("FSDP_VERSION", "2")
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        sharded.refuse_unsupported(SimpleNamespace(distributed_type=kind))
    sharded.refuse_unsupported(_fsdp_accelerator())


@pytest.mark.parametrize(("train", "plugin", "device", "names"), [
    ({"gradient_checkpointing": "on"}, {}, "cpu", ("train.gradient_checkpointing", "fsdp_activation_checkpointing")),
    ({}, {"cpu_offload": True}, "cpu", ("fsdp_offload_params", "false")),
    ({"optimizer": "adamw_8bit"}, {"cpu_offload": True}, "cuda", ("adamw_8bit", "train.optimizer=adamw")),
    ({"method": "qlora"}, {"cpu_ram_efficient_loading": True}, "cuda", ("fsdp_cpu_ram_efficient_loading", "false")),
    ({"kernels": "liger"}, {}, "cuda", ("train.kernels", "train.kernels=none")),
])
def test_fsdp2_combinations_that_cannot_work_are_refused_in_one_line(train, plugin, device, names):
    with pytest.raises(UserError) as exc:
        sharded.check(_recipe(**train), _fsdp_accelerator(**plugin), device)
    message = _one_line(exc)
    assert all(n in message for n in names), message


def test_fsdp2_settings_that_work_pass():
    for train in ({}, {"method": "full"}, {"method": "dora", "gradient_checkpointing": "off"}):
        sharded.check(_recipe(**train), _fsdp_accelerator(), "cpu")
    sharded.check(_recipe(method="qlora"), _fsdp_accelerator(activation_checkpointing=True), "cuda")
    sharded.check(_recipe(gradient_checkpointing="on"), SimpleNamespace(is_fsdp2=False), "cpu")  # DDP: its own


def test_layer_classes_come_from_the_model():
    """The decoder layer class of a dense and of a mixture-of-experts model, and the fallback when the family's
    _no_split_modules names nothing the model has."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert sharded.layer_classes(llama) == ["LlamaDecoderLayer"]
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2))
    assert sharded.layer_classes(moe) == ["Qwen3MoeDecoderLayer"]
    llama._no_split_modules = ["SomeVisionLayer"]
    assert sharded.layer_classes(llama) == ["LlamaDecoderLayer"]
    with pytest.raises(UserError, match="no repeated layers"):
        sharded.layer_classes(torch.nn.Linear(2, 2))


def test_every_config_snapshot_is_wrapped_by_its_decoder_layer(repo_root):
    """The families whose config.json we keep (tests/fixtures/configs), built on the meta device: each gets its
    decoder layer class (Qwen3.5's vision block, named in its _no_split_modules, is not in its text model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    found = {}
    for path in sorted((repo_root / "tests" / "fixtures" / "configs").glob("*.json")):
        config = AutoConfig.for_model(**json.loads(path.read_text()))
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # no causal-LM class for this config (Ministral 3's image-text config)
            continue
        found[path.stem] = sharded.layer_classes(model)
    assert len(found) >= 15
    for name, classes in found.items():
        assert any(c.endswith(("DecoderLayer",)) for c in classes), (name, classes)
    assert found["Qwen--Qwen3.5-4B"] == ["Qwen3_5DecoderLayer"]
    assert "Gemma4TextDecoderLayer" in found["google--gemma-4-E4B-it"]


# ------------------------------------------------------------------------- a resumed run, another process count
def _checkpoint(root: Path, fingerprint: str, processes: int, micro: int) -> Path:
    """A complete checkpoint folder as save() writes it (its weights do not matter to the refusal)."""
    state = ckpt.TrainState(fingerprint, micro, processes=processes, step=3).to_json()

    def write(folder: Path) -> None:
        for name in ("trainable.safetensors", ckpt.OPTIMIZER_FILE):
            (folder / name).write_bytes(b"")

    return ckpt.save(root / "checkpoints", 3, write, state, keep=2)


def test_resume_with_another_process_count(tmp_path):
    def fp(micro: int) -> str:
        return f"fingerprint-{micro}"

    out, work = tmp_path / "train", tmp_path / ".train.partial"
    found = _checkpoint(work, fp(2), processes=2, micro=2)
    # 1 process with grad_accum 2: the same micro-batches per step, so the same run continues
    assert ckpt.to_resume(out, work, fp(2), False, processes=1, grad_accum=2, fingerprint_for=fp) == (found, None)
    # 1 process with grad_accum 1: another run; say which grad_accum continues this one
    with pytest.raises(UserError) as exc:
        ckpt.to_resume(out, work, fp(1), False, processes=1, grad_accum=1, fingerprint_for=fp)
    assert "written by 2 processes" in _one_line(exc) and "train.grad_accum=2" in str(exc.value)
    # 3 processes cannot split 2 micro-batches per step
    with pytest.raises(UserError) as exc:
        ckpt.to_resume(out, work, fp(3), True, processes=3, grad_accum=1, fingerprint_for=fp)
    assert "3 processes cannot split the 2 micro-batches" in _one_line(exc) and "launch 1, 2 processes" in str(exc.value)
    assert ckpt.latest(work / "checkpoints") == found  # nothing was touched
    # a changed recipe (not only the process count): started over, as before
    assert ckpt.to_resume(out, work, "changed-1", False, processes=1, grad_accum=1,
                          fingerprint_for=lambda micro: f"changed-{micro}") == (None, None)


def test_resume_with_another_process_count_through_the_cli_exits_2(tmp_path, tiny_model_dir, cli):
    """`finetune train` (one process here) over the checkpoint of a 2-process run with the same grad_accum:
    exit 2, one line, the checkpoint kept."""
    from finetune.run import runs

    r = prepared(tmp_path, tiny_model_dir, "t", max_steps=4, batch_size=4, grad_accum=1)
    tokenized = r.run_dir("prepare") / "tokenized"
    data_fp = {split: runs.file_fingerprint(tokenized / split) for split in ("train", "validation")}
    work = r.run_dir("train").parent / ".train.partial"
    found = _checkpoint(work, ckpt.resume_fingerprint(r, data_fp, 2), processes=2, micro=2)
    code, out, err = cli("train", str(tmp_path / "t.yaml"))
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "written by 2 processes" in ln]
    assert len(lines) == 1 and "train.grad_accum=2" in lines[0], err
    assert json.loads((found / ckpt.STATE_FILE).read_text())["processes"] == 2
    assert not (r.run_dir("train") / "manifest.json").exists()


# ------------------------------------------------------------------------------------ the planner, per GPU
def test_plan_per_gpu_under_fsdp2_and_the_launcher(repo_root):
    """Llama-3.1-8B (its config.json snapshot) on 16 GB cards: LoRA does not fit one, fits sharded over 2 (FSDP2);
    QLoRA fits one, so 2 GPUs train data-parallel. Sharded parts shrink with the number of GPUs."""
    import torch

    from finetune import plan
    from finetune import recipe as recipe_mod

    config = repo_root / "tests" / "fixtures" / "configs" / "meta-llama--Llama-3.1-8B-Instruct.json"
    path = repo_root / "recipes" / "models" / "llama-3.1-8b-instruct-lora-24gb.yaml"
    lora = {n: plan.run(recipe_mod.load(path), gpu_gb=16, config_path=config, gpus=n) for n in (1, 2, 4)}
    assert lora[1]["launcher"]["command"] is None and not lora[1]["results"][0]["fits"]
    assert "recipes/accelerate/fsdp2.yaml --num_processes 2" in lora[2]["launcher"]["command"]
    assert lora[2]["results"][0]["fits"] and "per GPU, FSDP2" in lora[2]["results"][0]["target"]
    e = {n: lora[n]["results"][0]["estimate"] for n in (1, 2, 4)}
    assert e[1]["optimizer"] == 2 * e[2]["optimizer"] == 4 * e[4]["optimizer"]
    assert e[1]["weights"] > e[2]["weights"] > e[4]["weights"] > e[1]["weights"] / 4  # plus what is gathered
    assert e[1]["activations"] == e[4]["activations"]  # each GPU runs its own micro-batches
    qlora = plan.run(recipe_mod.load(path, ["train.method=qlora"]), gpu_gb=16, config_path=config, gpus=2)
    assert "multi-gpu.yaml --num_processes 2" in qlora["launcher"]["command"]
    text = plan.format_plan(lora[2])
    assert "on 2 GPUs: FSDP2" in text and "launch: accelerate launch --config_file recipes/accelerate/fsdp2.yaml" in text
    if not torch.cuda.is_available():  # no GPU here to size them by
        with pytest.raises(UserError, match="--gpu-gb"):
            plan.run(recipe_mod.load(path), config_path=config, gpus=2)
