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
from lorascale.errors import MismatchError, UnsupportedAdapterError
from lorascale.io.moe_layouts import SAVED_EXPERT_LAYOUTS
from runs import compare
from lorascale.store.schema import MATRICES, SIMILARITY, SPECTRA
from test_formats import OracleMatrix, by_key, check_run, read_table, safe_epsilon

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


def qwen3_moe(seed: int = 0):
    """Qwen3-MoE: fused [E, out, in] in memory, saved per expert (mlp.experts.N.gate_proj/up_proj/down_proj);
    hidden = 2 * moe_intermediate makes gate_up_proj square."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    checkpoints._quiet_transformers()
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, vocab_size=64, decoder_sparse_step=1, mlp_only_layers=[],
                            tie_word_embeddings=False)
    return _condition(Qwen3MoeForCausalLM(config).eval(), seed + 5000)


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
    for matrix in expected.values():
        matrix.delta = matrix.w - matrix.w0
    lora_units = {unit for (model, unit) in expected if model == str(tmp_path / "lora")}
    assert lora_units == {"model.layers.0.self_attn.q_proj.weight",
                          *(f"model.layers.0.mlp.experts.{p}[{e}]" for p in ("gate_up_proj", "down_proj")
                            for e in range(3))}
    # peft merged in fp32: drop its round-off from the oracle's delta by rebuilding the LoRA delta at rank R.
    for (_model, unit), matrix in expected.items():
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
    for (_model, unit), (row,) in rows.items():
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


# Per-expert names save_pretrained writes for each fused parameter, per model family; (gate, up) in this order.
PARTS = {"mixtral": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
         "qwen3_moe": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}}


def _rank_r(delta: np.ndarray, unit: str) -> np.ndarray:
    """peft merged in fp32: its round-off removed by keeping the rank-R part of the delta."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    assert s[R] < 1e-5 * s[0], f"{unit}: peft's merge is not a rank-{R} update"
    return (u[:, :R] * s[:R]) @ vt[:R]


@pytest.mark.parametrize("factory", [mixtral, qwen3_moe], ids=["mixtral", "qwen3_moe"])
def test_fused_adapter_on_per_expert_base_matches_peft_merge(tmp_path, factory):
    """transformers 5 holds Mixtral / Qwen3-MoE experts fused but saves them per expert: an adapter trained on the
    fused parameters (target_parameters) is split into the per-expert tensors exactly as peft's
    merge_and_unload + save_pretrained does (gate/w1 takes the first rows of gate_up_proj), and the run on the
    adapter equals the run on that merged checkpoint and the float64 oracle."""
    base_model = factory()
    model_type = base_model.config.model_type
    base = checkpoints.save_full(base_model, tmp_path / "base", max_shard_size="40KB")  # sharded, per expert
    peft_model = expert_adapter(base_model, tmp_path / "lora")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_dir = checkpoints.save_full(merged, tmp_path / "merged", max_shard_size=None)
    base_w, merged_w = checkpoints.load_float64(base), checkpoints.load_float64(merged_dir)
    assert not any(w.ndim == 3 for w in base_w.values())  # saved per expert, 2-D
    experts = base_model.config.num_local_experts if model_type == "mixtral" else base_model.config.num_experts
    parts = PARTS[model_type]
    module = "block_sparse_moe.experts" if model_type == "mixtral" else "mlp.experts"
    lora = str(tmp_path / "lora")
    expected = {}
    for name, w0 in base_w.items():
        if _analysed(name, w0) and not np.array_equal(merged_w[name], w0):
            delta = _rank_r(merged_w[name] - w0, name)
            expected[lora, name] = OracleMatrix(w0, w0 + delta, delta, "lora")
    adapted = {name for _, name in expected}
    assert adapted == {f"model.layers.{layer}.self_attn.q_proj.weight" for layer in range(2)} | {
        f"model.layers.{layer}.{module}.{e}.{part}.weight" for layer in range(2) for e in range(experts)
        for names in parts.values() for part in names}
    # The split itself, against peft's own fused delta: gate (w1) takes rows [0, I) of expert e's B_e @ A_e.
    fused = merged_tensors(peft_model)
    fused_base = {k: v.detach().to(torch.float64).numpy() for k, v in base_model.state_dict().items()}
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"
    fused_delta = fused[gate_up][2] - fused_base[gate_up][2]
    gate, up = (f"model.layers.1.{module}.2.{p}.weight" for p in parts["gate_up_proj"])
    half = fused_delta.shape[0] // 2
    np.testing.assert_allclose(merged_w[gate] - base_w[gate], fused_delta[:half], atol=1e-6)
    np.testing.assert_allclose(merged_w[up] - base_w[up], fused_delta[half:], atol=1e-6)

    epsilon = safe_epsilon(expected)
    compare(str(base), [lora], tmp_path / "out", epsilon=epsilon, use_cache=False, device="cpu")
    check_run(tmp_path / "out", str(base), expected, epsilon=epsilon, strict_intruders=True)
    # The merged checkpoint's run (every matrix, unchanged ones too) agrees on every adapted matrix.
    compare(str(base), [str(merged_dir)], tmp_path / "out-merged", epsilon=epsilon, use_cache=False, device="cpu")
    rows = by_key(read_table(tmp_path / "out", MATRICES), "matrix")
    twins = by_key(read_table(tmp_path / "out-merged", MATRICES), "matrix")
    spectra = by_key(read_table(tmp_path / "out", SPECTRA), "role", "matrix")
    twin_spectra = by_key(read_table(tmp_path / "out-merged", SPECTRA), "role", "matrix")
    assert {name for (name,) in rows} == adapted
    for name in adapted:
        (row,), (twin,) = rows[name,], twins[name,]
        assert (row["update"], twin["update"]) == ("lora", "full")
        assert (row["expert"], row["layer"], row["module"], row["intruders"]) == (
            twin["expert"], twin["layer"], twin["module"], twin["intruders"])
        assert row["expert"] == (int(name.split(".experts.")[1].split(".")[0]) if ".experts." in name else None)
        assert row["delta_fro"] == pytest.approx(twin["delta_fro"], rel=1e-3)
        ours, theirs = (sorted(t["tuned", name], key=lambda r: r["rank"]) for t in (spectra, twin_spectra))
        np.testing.assert_allclose([r["sigma"] for r in ours], [r["sigma"] for r in theirs], rtol=1e-5)
        np.testing.assert_allclose([r["max_cos"] for r in ours[:10]], [r["max_cos"] for r in theirs[:10]], atol=1e-3)


def test_per_expert_split_follows_transformers_conversion_mapping():
    """Every model type lorascale splits: transformers' own key renaming turns the per-expert names lorascale
    expects (expert 3, each part) into the fused parameter, from the converter's source patterns in lorascale's
    part order, stacked by MergeModulelist(dim=0) and concatenated along the out dim (Concatenate(dim=1))."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from lorascale.io.moe_layouts import saved_expert_parts

    for model_type, layout in SAVED_EXPERT_LAYOUTS.items():
        transforms = get_checkpoint_conversion_mapping(model_type)
        assert transforms, f"transformers has no conversion mapping for {model_type}"
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        block = "feed_forward" if model_type in ("jamba", "lfm2_moe") else "mlp"
        for fused, parts in layout.parts.items():
            parameter = f"model.layers.0.{block}.experts.{fused}"
            options = saved_expert_parts(model_type, parameter, 3)
            assert options and options[-1] == tuple(f"model.layers.0.{block}.experts.3.{p}.weight" for p in parts)
            for names in options:
                for index, name in enumerate(names):
                    renamed, source = rename_source_key(name, renamings, converters)
                    assert renamed == parameter, (model_type, name)
                    (converter,) = [c for c in converters if source in c.source_patterns]
                    assert converter.source_patterns.index(source) == index, (model_type, name)
                    assert len(converter.source_patterns) == len(parts)
                    ops = [(type(op).__name__, op.dim) for op in converter.operations]
                    assert ops == [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(parts) > 1 else [])


def test_fused_adapter_on_per_expert_base_of_unknown_model_type_is_a_clear_error(tmp_path):
    """A per-expert base whose model type's split lorascale does not know: refused naming the parameter, exit 4,
    nothing written; nothing is guessed."""
    base_model = mixtral()
    base = checkpoints.save_full(base_model, tmp_path / "base", max_shard_size=None)
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "my_moe"
    (base / "config.json").write_text(json.dumps(config))
    expert_adapter(base_model, tmp_path / "lora")
    with pytest.raises(UnsupportedAdapterError, match=r"fused expert parameter 'model\.layers\.\d\.mlp\.experts\."
                                                      r"(gate_up|down)_proj'.*'my_moe'") as caught:
        compare(str(base), [str(tmp_path / "lora")], tmp_path / "out", use_cache=False, device="cpu")
    assert caught.value.exit_code == 4
    assert not (tmp_path / "out").exists()


def test_fused_adapter_against_the_wrong_per_expert_base_is_a_clear_error(tmp_path):
    """The adapter's experts (3) and the base's (4 per layer) disagree: refused naming the factors."""
    from transformers import MixtralForCausalLM

    base_model = mixtral()
    expert_adapter(base_model, tmp_path / "lora")
    config = copy.deepcopy(base_model.config)
    config.num_local_experts = 4
    torch.manual_seed(0)
    other = checkpoints.save_full(MixtralForCausalLM(config).eval(), tmp_path / "base", max_shard_size=None)
    with pytest.raises(MismatchError, match="none fits"):
        compare(str(other), [str(tmp_path / "lora")], tmp_path / "out", use_cache=False, device="cpu")
    assert not (tmp_path / "out").exists()
