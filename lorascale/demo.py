"""An offline demo: a small Llama-shaped base, a full fine-tune and a LoRA adapter, written as real
checkpoints (sharded bf16 safetensors with an index; fp16 single file; PEFT adapter) and then compared.

The weights are synthetic but shaped like the paper's situation: the base has a decaying spectrum; the
full fine-tune adds a small dense update (gradient noise plus a nudge along existing directions); the
adapter adds s * B @ A with a few large new directions, which is what creates intruder dimensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 192, 512, 4, 512
MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
LORA_RANK, LORA_ALPHA = 4, 8
LORA_STRENGTH = torch.tensor([3.0, 2.2, 1.6, 1.2])  # vs the base's sigma_1 = 4


def _pretrained_like(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A matrix with a power-law spectrum, like trained weights: sigma_i ~ 4 / (1 + i)^0.6."""
    p = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, p, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, p, generator=gen))
    s = 4.0 / torch.arange(1, p + 1, dtype=torch.float32) ** 0.6
    return (u * s) @ v.T  # (rows, p) @ (p, cols)


def build_checkpoints(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write base/, full/ and lora/ under `root`; return their paths."""
    gen = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02,
                                     "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02,
                                     "model.norm.weight": torch.ones(HIDDEN)}
    full: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        base[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(HIDDEN)
        for module, (rows, cols) in MODULES.items():
            name = f"model.layers.{layer}.{module}.weight"
            w0 = _pretrained_like(rows, cols, gen)
            base[name] = w0
            # Full fine-tune: small dense noise plus a small change along the matrix's own top directions.
            u, s, vh = torch.linalg.svd(w0, full_matrices=False)
            nudge = (u[:, :8] * (0.05 * s[:8])) @ vh[:8]
            full[name] = w0 + nudge + 0.004 * torch.randn(rows, cols, generator=gen)
            # LoRA: a few new directions whose strength lies between the base's top singular values.
            a = torch.linalg.qr(torch.randn(cols, LORA_RANK, generator=gen))[0].T  # (r, cols), orthonormal rows
            q = torch.linalg.qr(torch.randn(rows, LORA_RANK, generator=gen))[0]  # (rows, r)
            b = q * (LORA_STRENGTH / (LORA_ALPHA / LORA_RANK))  # so that s * B @ A has these singular values
            peft_name = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{peft_name}.lora_A.weight"] = a.contiguous()
            lora[f"{peft_name}.lora_B.weight"] = b.contiguous()
    paths = {"base": root / "base", "full": root / "full", "lora": root / "lora"}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    _save_sharded({k: v.to(torch.bfloat16) for k, v in base.items()}, paths["base"], shards=2)
    save_file({k: v.to(torch.float16).contiguous() for k, v in full.items()}, str(paths["full"] / "model.safetensors"),
              metadata={"format": "pt"})
    save_file(lora, str(paths["lora"] / "adapter_model.safetensors"), metadata={"format": "pt"})
    (paths["lora"] / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "target_modules": sorted({m.split(".")[-1] for m in MODULES}), "use_rslora": False,
        "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": str(paths["base"].resolve()),  # as peft writes it: valid from any directory
    }, indent=2))
    (paths["base"] / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB}, indent=2))
    return paths


def _save_sharded(tensors: dict[str, torch.Tensor], directory: Path, *, shards: int) -> None:
    """Save like transformers' save_pretrained: model-0000i-of-0000n.safetensors + index JSON."""
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[i * per_shard:(i + 1) * per_shard]}
        save_file(chunk, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
