"""Plan the matrix jobs: name matching (names.py), experts (experts.py), adapters (adapters.py), and the jobs
with what is not analysed and why (jobs.py)."""

from lorascale.plan.experts import expert_of, expert_slice, is_fused_experts, unit_name
from lorascale.plan.jobs import (DEFAULT_EXCLUDE, Plan, layer_and_module, matrix_problem, plan_jobs, selected,
                                 takes_part, tensor_use)
from lorascale.plan.names import NameMatcher
from lorascale.plan.rename import Rename, parse_renames, renamed

__all__ = ["DEFAULT_EXCLUDE", "NameMatcher", "Plan", "Rename", "expert_of", "expert_slice", "is_fused_experts",
           "layer_and_module", "matrix_problem", "parse_renames", "plan_jobs", "renamed", "selected", "takes_part",
           "tensor_use", "unit_name"]
