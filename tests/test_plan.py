"""Planning: name matching across naming schemes, layer/module labels, selection, job order, mismatches.

Pure units on header-level records: no tensor data is needed to plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lorascale.errors import CheckpointFormatError, MismatchError
from lorascale.io.adapter import index_adapter
from lorascale.io.checkpoint import Checkpoint
from lorascale.errors import OptionError
from lorascale.plan import NameMatcher, layer_and_module, parse_renames, plan_jobs, selected
from lorascale.records import AdapterSettings, ResolvedCheckpoint, Skipped, TensorEntry

LLAMA_SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
                "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
                "mlp.down_proj": (64, 128)}
BERT_SHAPES = {"attention.self.query": (32, 32), "attention.self.key": (32, 32), "attention.self.value": (32, 32),
               "attention.output.dense": (32, 32), "intermediate.dense": (64, 32), "output.dense": (32, 64)}


def entry(name: str, shape: tuple[int, ...], dtype: str = "F32", file: str = "model.safetensors") -> TensorEntry:
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1}.get(dtype, 1)
    n = 1
    for d in shape:
        n *= d
    return TensorEntry(name=name, file=Path(file), dtype=dtype, shape=shape, data_start=0, data_end=n * size)


def full(reference: str, shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> Checkpoint:
    resolved = ResolvedCheckpoint(reference=reference, source="local-dir", kind="full", root=Path(reference),
                                  weight_files=(Path(reference) / "model.safetensors",))
    return Checkpoint(resolved, {n: entry(n, s, dtype) for n, s in shapes.items()})


def adapter(reference: str, modules: dict[str, tuple[int, int]], *, r: int = 4, prefix: str = "base_model.model.",
            fan_in_fan_out: bool = False, extra: dict[str, tuple[int, ...]] | None = None) -> Checkpoint:
    """A LoRA adapter on `modules` (module path -> W's stored shape)."""
    tensors = {}
    for module, (rows, cols) in modules.items():
        out_dim, in_dim = (cols, rows) if fan_in_fan_out else (rows, cols)
        tensors[f"{prefix}{module}.lora_A.weight"] = entry(f"{prefix}{module}.lora_A.weight", (r, in_dim))
        tensors[f"{prefix}{module}.lora_B.weight"] = entry(f"{prefix}{module}.lora_B.weight", (out_dim, r))
    for name, shape in (extra or {}).items():
        tensors[name] = entry(name, shape)
    settings = AdapterSettings(r=r, lora_alpha=2 * r, fan_in_fan_out=fan_in_fan_out)
    resolved = ResolvedCheckpoint(reference=reference, source="local-dir", kind="lora", root=Path(reference),
                                  weight_files=(Path(reference) / "adapter_model.safetensors",),
                                  adapter_config=Path(reference) / "adapter_config.json")
    return Checkpoint(resolved, tensors, settings, index_adapter(resolved.weight_files[0], settings, tensors))


def llama_names(prefix: str = "model.", layers: int = 2) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (96, 64)}
    for layer in range(layers):
        for module, shape in LLAMA_SHAPES.items():
            shapes[f"{prefix}layers.{layer}.{module}.weight"] = shape
        shapes[f"{prefix}layers.{layer}.input_layernorm.weight"] = (64,)
    shapes[f"{prefix}norm.weight"] = (64,)
    shapes["lm_head.weight"] = (96, 64)
    return shapes


def bert_names(prefix: str = "", layers: int = 2) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embeddings.word_embeddings.weight": (100, 32)}
    for layer in range(layers):
        for module, shape in BERT_SHAPES.items():
            shapes[f"{prefix}encoder.layer.{layer}.{module}.weight"] = shape
            shapes[f"{prefix}encoder.layer.{layer}.{module}.bias"] = (shape[0],)
    shapes[f"{prefix}pooler.dense.weight"] = (32, 32)
    return shapes


# --- Name matching ----------------------------------------------------------------------------------------------


def test_matcher_exact_and_prefixes():
    base = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight",
            "model.layers.0.self_attn.q_proj.weight"]
    matcher = NameMatcher(base)
    assert matcher.match("encoder.layer.0.output.dense.weight") == "encoder.layer.0.output.dense.weight"
    # The tuned model carries a task-head prefix (BertForSequenceClassification: bert.encoder...).
    assert matcher.match("bert.encoder.layer.0.attention.self.query.weight") == base[0]
    assert matcher.match("roberta.encoder.layer.0.output.dense.weight") == base[1]
    # PEFT module paths: base_model.model.<the model's own path>.
    assert matcher.match("base_model.model.model.layers.0.self_attn.q_proj.weight") == base[2]
    assert matcher.match("encoder.layer.1.output.dense.weight") is None
    assert matcher.match("lm_head.weight") is None


def test_matcher_base_with_extra_prefix():
    base = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.query.weight"]
    matcher = NameMatcher(base)
    assert matcher.match("encoder.layer.1.attention.self.query.weight") == base[1]
    assert matcher.match("layer.0.attention.self.query.weight") == base[0]


def test_matcher_refuses_ambiguous_suffixes():
    matcher = NameMatcher(["encoder.layer.0.dense.weight", "decoder.layer.0.dense.weight"])
    with pytest.raises(MismatchError, match="'encoder.layer.0.dense.weight' and 'decoder.layer.0.dense.weight'"):
        matcher.match("layer.0.dense.weight")  # could be either
    assert matcher.match("x.encoder.layer.0.dense.weight") == "encoder.layer.0.dense.weight"


@pytest.mark.parametrize(("base_prefix", "tuned_prefix"), [
    ("model.", "transformer."), ("transformer.", "model."), ("", "model."), ("model.", ""),
    ("bert.", ""), ("", "bert."), ("base_model.model.model.", "model."), ("model.", "base_model.model.x."),
])
def test_prefixes_in_either_direction_are_matched(base_prefix, tuned_prefix):
    base = full("base", llama_names(prefix=base_prefix))
    plan = plan_jobs(base, [full("tuned", llama_names(prefix=tuned_prefix))])
    assert {j.matrix for j in plan.jobs} == {f"{base_prefix}layers.{i}.{m}.weight" for i in range(2)
                                             for m in LLAMA_SHAPES}
    assert all(j.tuned[0].full.name == tuned_prefix + j.matrix.removeprefix(base_prefix) for j in plan.jobs)


def test_task_head_is_not_matched_to_a_lookalike_base_tensor():
    """RobertaForSequenceClassification has classifier.dense but no pooler; the base RobertaModel has a pooler:
    both end in dense.weight with the same shape, yet they are different tensors (their prefixes are not the
    checkpoint's prefix pair roberta. / '')."""
    base = full("base", bert_names())
    tuned_shapes = {n: s for n, s in bert_names(prefix="roberta.").items() if "pooler" not in n}
    tuned_shapes |= {"classifier.dense.weight": (32, 32), "classifier.out_proj.weight": (2, 32)}
    plan = plan_jobs(base, [full("tuned", tuned_shapes)])
    assert "pooler.dense.weight" not in {j.matrix for j in plan.jobs}
    assert Skipped("classifier.dense.weight", "only in the tuned checkpoint", "tuned") in plan.skipped
    assert Skipped("pooler.dense.weight", "only in the base checkpoint", "tuned") in plan.skipped


def test_ambiguous_suffix_names_both_candidates():
    """A multimodal base holds the same path under two towers; a tuned checkpoint without the tower prefix
    cannot be matched, and the error names both base tensors."""
    base = full("base", llama_names(prefix="language_model.") | llama_names(prefix="vision_model."))
    with pytest.raises(MismatchError, match=r"'language_model\.layers\.\d\..*' and 'vision_model\.layers"):
        plan_jobs(base, [full("tuned", llama_names(prefix=""))])
    # Two tuned names for one base name: ambiguous the other way round, both tuned names named.
    tuned = full("tuned2", llama_names(prefix="a.") | llama_names(prefix="b."))
    with pytest.raises(MismatchError, match=r"'a\.layers.*' and 'b\.layers"):
        plan_jobs(full("base", llama_names(prefix="")), [tuned])


def test_rename_maps_names_the_suffix_rule_cannot():
    gpt_like = {n.replace("model.layers.", "h.").replace("self_attn.", "attn."): s
                for n, s in llama_names().items()}
    plan = plan_jobs(full("base", llama_names()), [full("tuned", gpt_like)])
    # h.0.mlp.gate_proj finds model.layers.0.mlp.gate_proj (prefixes h. / model.layers.), but the attention
    # matrices share no suffix beyond q_proj.weight, which leaves out the layer index: they stay unmatched.
    assert Skipped("h.0.attn.q_proj.weight", "only in the tuned checkpoint", "tuned") in plan.skipped
    assert len(plan.jobs) == 2 * 3
    rules = parse_renames([r"^h\.=model.layers.", r"\.attn\.=.self_attn."])
    plan = plan_jobs(full("base", llama_names()), [full("tuned", gpt_like)], rename=rules)
    assert len(plan.jobs) == 2 * len(LLAMA_SHAPES)
    job = next(j for j in plan.jobs if j.matrix == "model.layers.1.self_attn.q_proj.weight")
    assert job.tuned[0].full.name == "h.1.attn.q_proj.weight"  # the stored name is read, the base's is reported
    # Groups work; the rename also applies to adapter module paths.
    rules = parse_renames([r"^transformer\.blocks\.(\d+)\.=model.layers.\1."])
    lora = adapter("lora", {"transformer.blocks.0.self_attn.q_proj": (64, 64)})
    (job,) = plan_jobs(full("base", llama_names()), [lora], rename=rules).jobs
    assert job.matrix == "model.layers.0.self_attn.q_proj.weight"


def test_rename_that_merges_two_names_is_refused():
    rules = parse_renames([r"layers\.\d+\.=layers.0."])
    with pytest.raises(MismatchError, match="rename maps both"):
        plan_jobs(full("base", llama_names()), [full("tuned", llama_names())], rename=rules)


@pytest.mark.parametrize("spec", ["(unclosed=x", "no-equals-sign", "=x", r"a=\2", r"(?P<n>a)=\g<m>"])
def test_bad_rename_is_an_option_error(spec):
    with pytest.raises(OptionError, match="rename=") as info:
        parse_renames([spec])
    assert info.value.exit_code == 2


# --- Mixture-of-experts -----------------------------------------------------------------------------------------


def test_fused_expert_tensor_is_one_job_per_expert_with_byte_ranges():
    shapes = llama_names() | {"model.layers.0.mlp.experts.gate_up_proj": (4, 16, 64),
                              "model.layers.0.mlp.experts.down_proj": (4, 64, 8),
                              "model.layers.0.mlp.gate.weight": (4, 64),
                              "model.layers.0.conv.weight": (8, 4, 3)}  # 3-D outside experts: not analysed
    base, tuned = full("base", shapes), full("tuned", {f"x.{n}": s for n, s in shapes.items()})
    plan = plan_jobs(base, [tuned])
    jobs = {j.matrix: j for j in plan.jobs}
    fused = base.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    for e in range(4):
        job = jobs[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"]
        # mlp.down_proj and mlp.experts.down_proj share a last component: modules are paths after the layer
        assert (job.expert, job.rows, job.cols, job.layer, job.module) == (e, 16, 64, 0, "mlp.experts.gate_up_proj")
        assert (job.base.data_start, job.base.data_end) == (e * 16 * 64 * 4, (e + 1) * 16 * 64 * 4)
        assert job.base.name == fused.name and job.base.expert == e and job.base.shape == (16, 64)
        assert job.tuned[0].full.name == "x.model.layers.0.mlp.experts.gate_up_proj"
        assert job.tuned[0].full.data_start == e * 16 * 64 * 4
    assert jobs["model.layers.0.mlp.gate.weight"].expert is None  # the router: a plain 2-D matrix
    assert not any("conv" in name for name in jobs)


def test_per_expert_names_carry_their_expert_and_share_a_module():
    names = ["model.layers.3.block_sparse_moe.experts.0.w1.weight", "model.layers.3.block_sparse_moe.experts.7.w1.weight",
             "model.layers.3.block_sparse_moe.gate.weight", "model.layers.3.self_attn.q_proj.weight"]
    labels = layer_and_module(names)
    assert labels[names[0]] == labels[names[1]] == (3, "w1")
    assert labels[names[2]] == (3, "gate")
    shapes = {n: (8, 16) for n in names}
    plan = plan_jobs(full("base", shapes), [full("tuned", shapes)])
    assert {j.matrix: j.expert for j in plan.jobs} == {names[0]: 0, names[1]: 7, names[2]: None, names[3]: None}


def test_full_tuned_with_task_prefix_and_head(tmp_path):
    base = full("base", bert_names())
    tuned_shapes = bert_names(prefix="bert.") | {"classifier.weight": (2, 32)}
    plan = plan_jobs(base, [full("tuned", tuned_shapes)])
    assert {j.matrix for j in plan.jobs} == {n for n, s in bert_names().items()
                                             if len(s) == 2 and n.endswith(".weight") and "embeddings" not in n}
    for job in plan.jobs:
        (source,) = job.tuned
        assert source.full.name == "bert." + job.matrix and source.model == "tuned"
    skipped = {(s.matrix, s.model): s.reason for s in plan.skipped}
    assert "only in the tuned" in skipped["classifier.weight", "tuned"]
    assert "not selected" in skipped["embeddings.word_embeddings.weight", None]
    assert not any(".bias" in s.matrix for s in plan.skipped)  # 1-D: not matrices


def test_only_floating_2d_tensors_are_matrices():
    shapes = llama_names()
    base = full("base", shapes)
    base.tensors["model.position_ids"] = entry("model.position_ids", (1, 64), "I64")
    plan = plan_jobs(base, [full("tuned", shapes)], include=("*",))
    names = {j.matrix for j in plan.jobs}
    assert "model.position_ids" not in names and "model.norm.weight" not in names
    assert "model.embed_tokens.weight" in names and len(names) == 16
    assert not any(s.matrix == "model.norm.weight" for s in plan.skipped)  # 1-D: not a matrix at all
    reasons = {(s.matrix, s.model): s.reason for s in plan.skipped}
    assert reasons["model.position_ids", None] == "dtype I64 is not a floating type lorascale analyses"


def test_adapter_with_peft_prefix_on_a_base_with_task_prefix():
    base = full("base", bert_names(prefix="bert."))
    lora = adapter("lora", {f"encoder.layer.{i}.attention.self.{m}": (32, 32) for i in range(2)
                            for m in ("query", "value")})
    plan = plan_jobs(base, [lora])
    assert {j.matrix for j in plan.jobs} == {f"bert.encoder.layer.{i}.attention.self.{m}.weight"
                                             for i in range(2) for m in ("query", "value")}
    assert all(j.tuned[0].update == "lora" for j in plan.jobs)
    reasons = {s.matrix: s.reason for s in plan.skipped}
    assert "not changed by any tuned model" in reasons["bert.encoder.layer.0.attention.self.key.weight"]


def test_modules_to_save_are_reported_not_analysed():
    base = full("base", llama_names())
    lora = adapter("lora", {"model.layers.0.self_attn.q_proj": (64, 64)},
                   extra={"base_model.model.lm_head.modules_to_save.default.weight": (96, 64)})
    plan = plan_jobs(base, [lora])
    assert [j.matrix for j in plan.jobs] == ["model.layers.0.self_attn.q_proj.weight"]
    reasons = {s.matrix: s.reason for s in plan.skipped if s.model == "lora"}
    assert "modules_to_save" in reasons["base_model.model.lm_head.modules_to_save.default.weight"]


# --- Labels -----------------------------------------------------------------------------------------------------


def test_llama_labels():
    names = [n for n, s in llama_names().items() if len(s) == 2 and ".layers." in n]
    labels = layer_and_module(names)
    assert labels["model.layers.0.self_attn.q_proj.weight"] == (0, "q_proj")
    assert labels["model.layers.1.mlp.down_proj.weight"] == (1, "down_proj")
    assert {m for _, m in labels.values()} == {m.split(".")[-1] for m in LLAMA_SHAPES}


def test_bert_labels():
    names = [f"encoder.layer.{i}.{m}.weight" for i in (0, 11) for m in BERT_SHAPES]
    labels = layer_and_module(names)
    assert labels["encoder.layer.0.attention.self.query.weight"] == (0, "attention.self.query")
    assert labels["encoder.layer.11.attention.output.dense.weight"] == (11, "attention.output.dense")
    assert labels["encoder.layer.0.intermediate.dense.weight"] == (0, "intermediate.dense")
    assert labels["encoder.layer.0.output.dense.weight"] == (0, "output.dense")
    assert {m for _, m in labels.values()} == set(BERT_SHAPES)


def test_gpt2_and_unnumbered_labels():
    labels = layer_and_module(["transformer.h.3.attn.c_attn.weight", "transformer.h.3.attn.c_proj.weight",
                               "transformer.h.3.mlp.c_fc.weight", "transformer.h.3.mlp.c_proj.weight",
                               "pooler.dense.weight"])
    assert labels["transformer.h.3.attn.c_attn.weight"] == (3, "attn.c_attn")
    assert labels["transformer.h.3.mlp.c_proj.weight"] == (3, "mlp.c_proj")
    assert labels["pooler.dense.weight"] == (None, "pooler.dense")


def test_plan_labels_jobs():
    plan = plan_jobs(full("base", llama_names()), [full("tuned", llama_names())])
    job = next(j for j in plan.jobs if j.matrix == "model.layers.1.self_attn.k_proj.weight")
    assert (job.layer, job.module, job.rows, job.cols) == (1, "k_proj", 32, 64)


# --- Selection and order ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, include, exclude, expected", [
    ("model.embed_tokens.weight", (), (), False),
    ("lm_head.weight", (), (), False),
    ("transformer.wte.weight", (), (), False),
    ("wpe.weight", (), (), False),
    ("shared.weight", (), (), False),
    ("model.layers.0.self_attn.q_proj.weight", (), (), True),
    ("model.embed_tokens.weight", ("*embed*",), (), True),  # --include wins over the default exclusions
    ("model.layers.0.self_attn.q_proj.weight", ("*mlp*",), (), False),
    ("model.layers.0.mlp.up_proj.weight", ("*mlp*",), ("*up_proj*",), False),  # --exclude wins over all
    ("model.layers.0.mlp.up_proj.weight", (), ("*layers.0.*",), False),
])
def test_selected(name, include, exclude, expected):
    assert selected(name, include, exclude) is expected


def test_largest_first_with_stable_ties():
    base = full("base", llama_names(layers=3))
    plan = plan_jobs(base, [full("a", llama_names(layers=3)), full("b", llama_names(layers=3))])
    costs = [j.cost for j in plan.jobs]
    assert costs == sorted(costs, reverse=True)
    assert plan.jobs[0].rows * plan.jobs[0].cols == 128 * 64
    assert plan.jobs[-1].module in ("k_proj", "v_proj")
    order = list(base.tensors)
    for first, second in zip(plan.jobs, plan.jobs[1:]):
        if first.cost == second.cost:  # ties: checkpoint order, so runs are reproducible
            assert order.index(first.matrix) < order.index(second.matrix)
    assert all([s.model for s in j.tuned] == ["a", "b"] for j in plan.jobs)
    assert len(plan.jobs) == 21


def test_include_exclude_in_plan():
    base, tuned = full("base", llama_names()), full("tuned", llama_names())
    plan = plan_jobs(base, [tuned], include=("*q_proj*", "*embed*"), exclude=("*layers.1.*",))
    assert {j.matrix for j in plan.jobs} == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    with pytest.raises(MismatchError, match="no matrix left"):
        plan_jobs(base, [tuned], include=("*nothing*",))


# --- Mismatches -------------------------------------------------------------------------------------------------


def test_base_given_as_adapter():
    lora = adapter("lora", {"model.layers.0.self_attn.q_proj": (64, 64)})
    with pytest.raises(MismatchError, match="base must be a full checkpoint") as info:
        plan_jobs(lora, [full("tuned", llama_names())])
    assert info.value.fix and "lora" in str(info.value)


def test_shape_mismatch_names_tensor():
    tuned = llama_names() | {"model.layers.1.mlp.up_proj.weight": (96, 64)}
    with pytest.raises(MismatchError, match=r"\[96, 64\] differs from the base's \[128, 64\]") as info:
        plan_jobs(full("base", llama_names()), [full("tuned", tuned)])
    assert info.value.tensor == "model.layers.1.mlp.up_proj.weight"


def test_resized_vocabulary_is_skipped_not_fatal():
    tuned = llama_names() | {"model.embed_tokens.weight": (97, 64), "lm_head.weight": (97, 64)}
    plan = plan_jobs(full("base", llama_names()), [full("tuned", tuned)])
    reasons = {s.matrix: s.reason for s in plan.skipped if s.model == "tuned"}
    assert "resized vocabulary" in reasons["model.embed_tokens.weight"]
    assert len(plan.jobs) == 14


def test_adapter_targets_missing_from_base():
    lora = adapter("lora", {"transformer.h.0.attn.c_attn": (64, 192)}, fan_in_fan_out=True)
    with pytest.raises(MismatchError, match="targets 1 module") as info:
        plan_jobs(full("base", llama_names()), [lora])
    assert "transformer.h.0.attn.c_attn" in str(info.value) and info.value.fix


def test_adapter_shape_mismatch_and_fan_in_fan_out():
    base = full("base", {"transformer.h.0.attn.c_attn.weight": (64, 192)})
    ok = adapter("ok", {"transformer.h.0.attn.c_attn": (64, 192)}, fan_in_fan_out=True)
    (job,) = plan_jobs(base, [ok]).jobs
    assert job.tuned[0].lora.fan_in_fan_out and (job.rows, job.cols) == (64, 192)
    # The same factors without fan_in_fan_out give a [192, 64] update: refused, with the hint.
    wrong = adapter("wrong", {"transformer.h.0.attn.c_attn": (192, 64)})
    with pytest.raises(MismatchError, match="fan_in_fan_out"):
        plan_jobs(base, [wrong])


def test_no_shared_matrix():
    with pytest.raises(MismatchError, match="no weight matrix matches"):
        plan_jobs(full("base", llama_names()), [full("other", bert_names())])


def test_adapter_config_rank_disagreeing_with_factors():
    tensors = {"base_model.model.x.lora_A.weight": entry("base_model.model.x.lora_A.weight", (4, 8)),
               "base_model.model.x.lora_B.weight": entry("base_model.model.x.lora_B.weight", (8, 4))}
    with pytest.raises(CheckpointFormatError, match="r=8"):
        index_adapter(Path("a.safetensors"), AdapterSettings(r=8, lora_alpha=16), tensors)
    with pytest.raises(CheckpointFormatError, match="no lora_B"):
        index_adapter(Path("a.safetensors"), AdapterSettings(r=4, lora_alpha=8),
                      {k: v for k, v in tensors.items() if "lora_A" in k})


# --- Tensors that cannot be analysed, and the user's selection first ------------------------------------------


def _with(checkpoint: Checkpoint, name: str, shape: tuple[int, ...], dtype: str) -> Checkpoint:
    checkpoint.tensors[name] = entry(name, shape, dtype)
    return checkpoint


Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("dtype, words", [
    ("I8", "dtype I8 is not a floating type lorascale analyses (quantized?)"),
    ("U8", "(quantized?)"),
    ("BOOL", "dtype BOOL is not a floating type"),
    ("F8_E4M3", "low-precision float"),
    ("F8_E8M0", "low-precision float"),
    ("F4", "low-precision float"),
    ("C64", "complex"),
    ("Q4_FUTURE", "dtype 'Q4_FUTURE' is unknown to lorascale"),
])
def test_tuned_tensor_of_an_unanalysed_dtype_is_skipped_with_the_true_reason(dtype, words):
    """A quantized/unknown tuned tensor beside float ones: skipped for that model, not "only in the base"."""
    tuned = _with(full("tuned", llama_names()), Q0, (64, 64), dtype)
    plan = plan_jobs(full("base", llama_names()), [tuned])
    assert Q0 not in {j.matrix for j in plan.jobs} and len(plan.jobs) == 13
    reasons = [s.reason for s in plan.skipped if s.matrix == Q0 and s.model == "tuned"]
    assert len(reasons) == 1 and words in reasons[0], reasons


@pytest.mark.parametrize("dtype", ["I8", "F8_E5M2", "F6_E2M3", "NEW"])
def test_base_tensor_of_an_unanalysed_dtype_is_skipped_for_every_model(dtype):
    base = _with(full("base", llama_names()), Q0, (64, 64), dtype)
    lora = adapter("lora", {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)})
    plan = plan_jobs(base, [full("tuned", llama_names()), lora])
    assert Q0 not in {j.matrix for j in plan.jobs}
    records = [s for s in plan.skipped if s.matrix == Q0]
    assert [(s.model, "dtype" in s.reason) for s in records] == [(None, True)], records
    assert not any("only in the tuned" in s.reason for s in plan.skipped)


def test_quantized_adapter_factors_are_skipped():
    lora = adapter("lora", {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)})
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors = dict(lora.tensors) | {name: entry(name, (4, 64), "I8")}
    indexed = index_adapter(Path("lora/adapter_model.safetensors"), lora.adapter, tensors)
    assert "model.layers.0.self_attn.q_proj" not in indexed.factors
    assert "(quantized?)" in indexed.other[name]
    plan = plan_jobs(full("base", llama_names()), [Checkpoint(lora.resolved, tensors, lora.adapter, indexed)])
    assert [j.matrix for j in plan.jobs] == ["model.layers.0.self_attn.v_proj.weight"]


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (0, 0)])
def test_empty_matrix_is_skipped_at_plan_time(shape):
    shapes = llama_names() | {"model.layers.0.extra.weight": shape}
    plan = plan_jobs(full("base", shapes), [full("tuned", shapes)])
    assert "model.layers.0.extra.weight" not in {j.matrix for j in plan.jobs}
    reasons = {s.matrix: s.reason for s in plan.skipped if s.model is None}
    assert reasons["model.layers.0.extra.weight"] == f"empty matrix {list(shape)}: nothing to decompose"


def test_exclude_bypasses_a_shape_mismatch():
    """The mismatch error says "or exclude it": excluding it must then work (it was checked before selection)."""
    tuned = full("tuned", llama_names() | {"model.layers.1.mlp.up_proj.weight": (96, 64)})
    with pytest.raises(MismatchError, match="exclude it"):
        plan_jobs(full("base", llama_names()), [tuned])
    plan = plan_jobs(full("base", llama_names()), [tuned], exclude=("*layers.1.mlp.up_proj*",))
    assert len(plan.jobs) == 13 and "model.layers.1.mlp.up_proj.weight" not in {j.matrix for j in plan.jobs}
    reasons = {(s.matrix, s.model): s.reason for s in plan.skipped}
    assert "not selected" in reasons["model.layers.1.mlp.up_proj.weight", None]
    assert not any("only in the base" in r for r in reasons.values())
    # --include picks matrices the same way: a mismatch outside it does not stop the run either.
    assert len(plan_jobs(full("base", llama_names()), [tuned], include=("*q_proj*",)).jobs) == 2


def test_exclude_bypasses_an_adapter_shape_mismatch():
    lora = adapter("lora", {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.up_proj": (96, 64)})
    with pytest.raises(MismatchError, match="exclude it"):
        plan_jobs(full("base", llama_names()), [lora])
    plan = plan_jobs(full("base", llama_names()), [lora], exclude=("*up_proj*",))
    assert [j.matrix for j in plan.jobs] == [Q0]


def test_nothing_analysable_says_why():
    shapes = {n: s for n, s in llama_names().items() if len(s) == 2}
    base = full("base", shapes, dtype="I8")
    with pytest.raises(MismatchError, match="no matrix left to analyse, .*quantized"):
        plan_jobs(base, [full("tuned", shapes)])
