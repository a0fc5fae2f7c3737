"""How transformers lays out mixture-of-experts weights, in memory and on disk, per config.json model_type.

Since transformers 5, Mixtral-, Qwen-MoE- and DeepSeek-style models hold their experts fused in memory
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]) but `save_pretrained` writes them
one expert at a time (`block_sparse_moe.experts.N.w1` / `w3` / `w2`, or `mlp.experts.N.gate_proj` / `up_proj` /
`down_proj`), undoing the checkpoint conversion mapping it loads them with (transformers/conversion_mapping.py):

    WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                    operations=[MergeModulelist(dim=0), Concatenate(dim=1)])
    WeightConverter(".experts.*.w2.weight", ".experts.down_proj", operations=[MergeModulelist(dim=0)])

So expert e's slice of the fused [E, out, in] parameter is its parts stacked along `out`, in the order the
converter lists them: gate_up_proj[e] = [w1_e; w3_e].  A PEFT adapter trained on the fused parameter
(`target_parameters`) is merged against such a base by giving each part its rows of B_e (plan.py).

The table below was read from transformers 5.24's mapping; tests/test_moe.py checks every entry against the
installed transformers' own key renaming, so a change there fails the tests instead of mis-splitting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# transformers' expert modules that store fused tensors as [E, in, out] (`is_transposed=True` in
# transformers.integrations.moe, which peft's ParamWrapper reads); every other layout is [E, out, in].  Only
# needed when d1 == d2, where the adapter's factor shapes cannot tell the two apart.
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "openai_privacy_filter", "aria"})


@dataclass(frozen=True)
class SavedExperts:
    """How one family of models saves its fused expert parameters per expert."""

    # fused parameter -> the per-expert modules concatenated along its `out` dim, in concatenation order
    parts: dict[str, tuple[str, ...]]
    # (regex on the in-memory experts module path, replacement): the saved path save_pretrained writes; the
    # in-memory path itself is tried after it, since transformers loads both
    module_renames: tuple[tuple[str, str], ...] = ()


_W1_W3_W2 = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
_GATE_UP_DOWN = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MIXTRAL = SavedExperts(_W1_W3_W2, ((r"(^|\.)mlp\.experts$", r"\1block_sparse_moe.experts"),))
_DEEPSEEK_V4 = SavedExperts(_W1_W3_W2)
_QWEN2_MOE = SavedExperts(_GATE_UP_DOWN)

# config.json model_type -> layout; the model types whose conversion mapping is exactly the one above
SAVED_EXPERT_LAYOUTS: dict[str, SavedExperts] = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2", "minimax_m3_vl", "phimoe", "kimi_linear"), _MIXTRAL),
    **dict.fromkeys(("deepseek_v4", "lfm2_moe"), _DEEPSEEK_V4),
    **dict.fromkeys((
        "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "qwen3_omni_moe", "qwen3_omni_moe_text",
        "qwen3_omni_moe_thinker", "qwen4_exp_text", "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
        "glm5_next", "glm5_next_text", "glm_moe_dsa", "hunyuan_v1_moe", "hy_v3", "kimi_k25", "kolibri1", "laguna",
        "longcat_flash", "mellum", "mimo_v2_flash", "sarvam_mla", "sarvam_moe", "solar_open", "afmoe", "axk1",
        "axk2", "bailing_hybrid", "beam", "cohere2_moe", "flint", "jamba"), _QWEN2_MOE),
}


def saved_expert_parts(model_type: str | None, parameter: str, expert: int) -> list[tuple[str, ...]] | None:
    """The tensor names save_pretrained gives expert `expert`'s parts of a fused expert parameter.

    `parameter` is the in-memory path (`model.layers.0.mlp.experts.gate_up_proj`). One tuple of part names per
    saved module path transformers loads, most likely first, each in concatenation order, e.g. for mixtral
    [("model.layers.0.block_sparse_moe.experts.3.w1.weight", "...experts.3.w3.weight"),
     ("model.layers.0.mlp.experts.3.w1.weight", "...experts.3.w3.weight")].
    None when the model type's layout is not known, or the parameter is not one it splits.
    """
    layout = SAVED_EXPERT_LAYOUTS.get(model_type or "")
    module, _, fused = parameter.rpartition(".")
    if layout is None or fused not in layout.parts or not re.search(r"(^|\.)experts$", module):
        return None
    modules = [re.sub(pattern, target, module) for pattern, target in layout.module_renames] + [module]
    return [tuple(f"{path}.{expert}.{part}.weight" for part in layout.parts[fused])
            for path in dict.fromkeys(modules)]
