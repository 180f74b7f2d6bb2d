"""KV-cache eviction policies, one small class per method (kvpress-style), and the registry by name.

Every cache kernel builds a step's ``Candidates`` with ``step_candidates`` and asks ``POLICIES[name]``
what each candidate is worth; adding a policy is a module here and a line in ``POLICIES``.
"""
from dynasparse.kernels.policies.base import Policy, last_valid
from dynasparse.kernels.policies.candidates import Candidates, step_candidates
from dynasparse.kernels.policies.expected_attention import ExpectedAttentionPolicy
from dynasparse.kernels.policies.full import FullPolicy, StreamingPolicy
from dynasparse.kernels.policies.h2o import H2OMeanPolicy, H2OPolicy
from dynasparse.kernels.policies.knorm import KNormPolicy
from dynasparse.kernels.policies.kvzip import KVzipPolicy
from dynasparse.kernels.policies.snapkv import SnapKVPolicy
from dynasparse.kernels.policies.tova import TOVAPolicy

POLICIES: dict[str, Policy] = {p.name: p for p in (
    FullPolicy(), StreamingPolicy(), H2OPolicy(), H2OMeanPolicy(), TOVAPolicy(), SnapKVPolicy(), KNormPolicy(),
    ExpectedAttentionPolicy(), KVzipPolicy())}

__all__ = ["POLICIES", "Candidates", "Policy", "last_valid", "step_candidates"]
