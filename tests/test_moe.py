"""Mixture-of-experts checkpoints against the float64 oracle: per-expert 2-D tensors, fused 3-D expert tensors
in both orientations ([E, out, in] and GPT-OSS's [E, in, out]), and peft adapters on expert parameters
(`target_parameters`, peft's ParamWrapper), whose merge is checked against peft's own merge_and_unload.

The models are built by transformers from tiny configs (random init), then every expert slice and layer
matrix is replaced by a well separated matrix (tests/checkpoints.py explains why).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
from lorascale.errors import MismatchError
from lorascale.pipeline import compare
from lorascale.store.schema import MATRICES, SIMILARITY, SPECTRA
from test_formats import Full, OracleMatrix, by_key, check_run, read_table, safe_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")
R = 2


def _condition(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every layer matrix and every expert slice of a fused expert tensor: a well separated matrix."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." not in name:
                continue
            if param.ndim == 2:
                param.copy_(checkpoints.separated(*param.shape, gen).to(param.dtype))
            elif param.ndim == 3:
                for e in range(param.shape[0]):
                    param[e].copy_(checkpoints.separated(*param.shape[1:], gen).to(param.dtype))
    return model


def _finetuned(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Dense noise plus a nudge along each matrix's (each expert slice's) own top directions."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            w = param.detach().to(torch.float64)
            update = 2e-3 * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            if ".layers." in name and w.ndim in (2, 3):
                for index in ([()] if w.ndim == 2 else [(e,) for e in range(w.shape[0])]):
                    u, s, vh = torch.linalg.svd(w[index], full_matrices=False)
                    update[index] += (u[:, :4] * (0.03 * s[:4])) @ vh[:4]
            param.copy_((w + update).to(param.dtype))
    return tuned


def gpt_oss(seed: int = 0):
    """GPT-OSS stores fused experts as [E, in, out]; hidden = 2 * intermediate makes gate_up_proj square, so
    only the model type can orient an adapter on it (peft reads the module's is_transposed)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    checkpoints._quiet_transformers()
    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, num_local_experts=3, num_experts_per_tok=2,
                          vocab_size=64, layer_types=["full_attention"])
    return _condition(GptOssForCausalLM(config).eval(), seed + 3000)


def mixtral(seed: int = 0):
    """Mixtral: fused [E, out, in] in memory, saved per expert (block_sparse_moe.experts.N.w1) by save_pretrained."""
    from transformers import MixtralConfig, MixtralForCausalLM

    checkpoints._quiet_transformers()
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=64,
                           tie_word_embeddings=False)
    return _condition(MixtralForCausalLM(config).eval(), seed + 4000)


def save_state_dict(model: torch.nn.Module, directory: Path) -> Path:
    """The in-memory (fused) layout as is: safetensors of state_dict() plus config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    model.config.to_json_file(str(directory / "config.json"))
    return directory


def expert_adapter(model: torch.nn.Module, directory: Path, *, seed: int = 5):
    """A LoRA on q_proj plus every fused expert parameter (target_parameters), with factors set so that each
    expert's s * B_e @ A_e has well separated singular values.  Returns (peft model, scaling)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    config = LoraConfig(r=R, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, lora_dropout=0.0,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = checkpoints._peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    strengths = torch.tensor([1.7, 0.9], dtype=torch.float64)
    with torch.no_grad():
        for _, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
                continue
            a_param, b_param = module.lora_A["default"].weight, module.lora_B["default"].weight
            experts = module.num_experts if isinstance(module, ParamWrapper) else 1
            scale = float(module.scaling["default"])
            a = torch.empty(a_param.shape, dtype=torch.float64)
            b = torch.empty(b_param.shape, dtype=torch.float64)
            for e in range(experts):
                qa, _ = torch.linalg.qr(torch.randn(a_param.shape[1], R, generator=gen, dtype=torch.float64))
                qb, _ = torch.linalg.qr(torch.randn(b_param.shape[0], R, generator=gen, dtype=torch.float64))
                a[e * R:(e + 1) * R] = qa.T
                b[:, e::experts] = qb * ((1 + 0.2 * e) * strengths / scale)
            a_param.copy_(a.to(a_param.dtype))
            b_param.copy_(b.to(b_param.dtype))
    peft_model.save_pretrained(directory)
    return peft_model


def merged_tensors(peft_model) -> dict[str, np.ndarray]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().to(torch.float64).numpy() for k, v in merged.state_dict().items()}


def _units(name: str, w: np.ndarray):
    if w.ndim == 3:
        return [(f"{name}[{e}]", e, w[e]) for e in range(w.shape[0])]
    return [(name, None, w)]


def _analysed(name: str, w: np.ndarray) -> bool:
    return ".layers." in name and w.ndim in (2, 3)


def test_fused_gpt_oss_full_and_expert_adapter_match_oracle(tmp_path):
    base_model = gpt_oss()
    base = checkpoints.save_full(base_model, tmp_path / "base", max_shard_size=None)
    full = checkpoints.save_full(_finetuned(base_model), tmp_path / "full", max_shard_size=None)
    peft_model = expert_adapter(base_model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    base_w = checkpoints.load_float64(base)
    assert base_w["model.layers.0.mlp.experts.gate_up_proj"].shape == (3, 32, 32)  # square: oriented by model_type
    assert base_w["model.layers.0.mlp.experts.down_proj"].shape == (3, 16, 32)  # [E, in, out]
    full_w = checkpoints.load_float64(full)
    peft_merged = merged_tensors(peft_model)
    expected = {}
    experts_seen = {}
    for name, w0 in base_w.items():
        if not _analysed(name, w0):
            continue
        for unit, expert, w0_unit in _units(name, w0):
            experts_seen[unit] = expert
            expected[str(full), unit] = OracleMatrix(w0_unit, _units(name, full_w[name])[expert or 0][2], None, "full")
            merged = _units(name, peft_merged[name])[expert or 0][2]
            if not np.array_equal(merged, w0_unit):  # adapted by the LoRA (q_proj and the experts)
                expected[str(tmp_path / "lora"), unit] = OracleMatrix(w0_unit, merged, None, "lora")
    for key, matrix in expected.items():
        matrix.delta = matrix.w - matrix.w0
    lora_units = {unit for (model, unit) in expected if model == str(tmp_path / "lora")}
    assert lora_units == {"model.layers.0.self_attn.q_proj.weight",
                          *(f"model.layers.0.mlp.experts.{p}[{e}]" for p in ("gate_up_proj", "down_proj")
                            for e in range(3))}
    # peft merged in fp32: drop its round-off from the oracle's delta by rebuilding the LoRA delta at rank R.
    for (model, unit), matrix in expected.items():
        if matrix.update == "lora":
            u, s, vt = np.linalg.svd(matrix.delta, full_matrices=False)
            assert s[R] < 1e-5 * s[0], f"{unit}: peft's merge is not a rank-{R} update"
            matrix.delta = (u[:, :R] * s[:R]) @ vt[:R]
            matrix.w = matrix.w0 + matrix.delta

    out = tmp_path / "out"
    epsilon = safe_epsilon(expected)
    compare(str(base), [str(full), str(tmp_path / "lora")], out, epsilon=epsilon, use_cache=False, device="cpu")
    check_run(out, str(base), expected, epsilon=epsilon, strict_intruders=True)

    rows = by_key(read_table(out, MATRICES), "model", "matrix")
    for (model, unit), (row,) in rows.items():
        assert row["expert"] == experts_seen[unit]
        if experts_seen[unit] is not None:
            assert (row["layer"], row["module"]) == (0, unit.split(".")[-1].split("[")[0])
    router = rows[str(full), "model.layers.0.mlp.router.weight"][0]  # the router: an ordinary 2-D matrix
    assert (router["expert"], router["rows"], router["cols"]) == (None, 3, 32)
    for table in (SPECTRA, SIMILARITY):
        for row in read_table(out, table):
            assert row["expert"] == experts_seen[row["matrix"]]


def test_fused_out_in_layout_and_adapter_match_peft(tmp_path):
    """Mixtral's in-memory layout [E, out, in] stored fused (e.g. a state_dict dump), with a target_parameters
    adapter: non-square experts, oriented from the factor shapes alone."""
    base_model = mixtral()
    base = save_state_dict(base_model, tmp_path / "base")
    peft_model = expert_adapter(base_model, tmp_path / "lora")
    base_w = checkpoints.load_float64(base)
    assert base_w["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 48, 32)  # [E, out, in]
    peft_merged = merged_tensors(peft_model)
    expected = {}
    for name, w0 in base_w.items():
        if not _analysed(name, w0):
            continue
        for unit, expert, w0_unit in _units(name, w0):
            merged = peft_merged[name][expert] if expert is not None else peft_merged[name]
            if np.array_equal(merged, w0_unit):
                continue
            delta = merged - w0_unit
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            assert s[R] < 1e-5 * s[0]
            delta = (u[:, :R] * s[:R]) @ vt[:R]
            expected[str(tmp_path / "lora"), unit] = OracleMatrix(w0_unit, w0_unit + delta, delta, "lora")
    assert len(expected) == 2 * (1 + 2 * 3)  # per layer: q_proj and 3 experts x (gate_up_proj, down_proj)
    out = tmp_path / "out"
    epsilon = safe_epsilon(expected)
    compare(str(base), [str(tmp_path / "lora")], out, epsilon=epsilon, use_cache=False, device="cpu")
    check_run(out, str(base), expected, epsilon=epsilon, strict_intruders=True)


def test_per_expert_layout_full_fine_tune_matches_oracle(tmp_path):
    """Mixtral as save_pretrained writes it: block_sparse_moe.experts.N.w1/w2/w3, 2-D, one per expert."""
    base_model = mixtral()
    base = checkpoints.save_full(base_model, tmp_path / "base", max_shard_size="40KB")
    tuned = checkpoints.save_full(_finetuned(base_model), tmp_path / "tuned", max_shard_size=None)
    base_w, tuned_w = checkpoints.load_float64(base), checkpoints.load_float64(tuned)
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in base_w
    expected = {(str(tuned), n): OracleMatrix(w0, tuned_w[n], tuned_w[n] - w0, "full")
                for n, w0 in base_w.items() if _analysed(n, w0)}
    out = tmp_path / "out"
    compare(str(base), [str(tuned)], out, use_cache=False, device="cpu")
    check_run(out, str(base), expected)
    for row in read_table(out, MATRICES):
        name = row["matrix"]
        if ".experts." in name:
            assert row["expert"] == int(name.split(".experts.")[1].split(".")[0])
            assert row["module"] == name.split(".")[-2]  # w1 / w2 / w3: the expert index is not in the module
        else:
            assert row["expert"] is None
    # the router (block_sparse_moe.gate) is analysed like any 2-D weight
    assert any(r["matrix"] == "model.layers.1.block_sparse_moe.gate.weight" for r in read_table(out, MATRICES))


def test_fused_adapter_on_per_expert_base_is_a_clear_error(tmp_path):
    """A target_parameters adapter names the fused in-memory parameter; a base saved per expert has no such
    tensor, which is refused naming the parameter (nothing is guessed)."""
    base_model = mixtral()
    base = checkpoints.save_full(base_model, tmp_path / "base", max_shard_size=None)
    expert_adapter(base_model, tmp_path / "lora")
    with pytest.raises(MismatchError, match="mlp.experts.(gate_up|down)_proj"):
        compare(str(base), [str(tmp_path / "lora")], tmp_path / "out", use_cache=False, device="cpu")
    assert not (tmp_path / "out").exists()
