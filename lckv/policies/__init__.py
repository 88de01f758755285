"""Selection policies and their registry.

=============  ==================================================================================
``full``       exact attention over every token (offloaded tokens attended in host memory)
``streaming``  StreamingLLM: sink + recent window, the rest evicted
``snapkv``     SnapKV: the prompt keys the last prompt queries vote for (static selection)
``quest``      Quest: pages ranked by per-page key min/max bounds, per decode query
``block``      InfLLM-style blocks ranked by representative keys, per decode query
``retrieval``  RetrievalAttention: per-head vector-index top-k (+ estimate of the rest)
``retrolm``    RetroLM: pages ranked by bookmark tokens with their own projections, per decode query
=============  ==================================================================================

>>> from lckv.policies import get_policy, StreamingPolicy
>>> get_policy("streaming", sink=4, window=256) == StreamingPolicy(sink=4, window=256)
True
"""
from lckv.policies.base import (
    Policy,
    PolicyConfigError,
    available_policies,
    get_policy,
    register_policy,
    resolve_policy,
)
from lckv.policies.basic import FullPolicy, StreamingPolicy
from lckv.policies.block import BlockPolicy
from lckv.policies.quest import QuestPolicy
from lckv.policies.retrieval import INDEX_KINDS, RetrievalPolicy
from lckv.policies.retrolm import RetroLMPolicy
from lckv.policies.selection import BudgetTooSmallError, SelectionPolicy
from lckv.policies.snapkv import SnapKVPolicy

__all__ = [
    "Policy", "PolicyConfigError", "available_policies", "get_policy", "register_policy", "resolve_policy",
    "FullPolicy", "StreamingPolicy", "SelectionPolicy", "SnapKVPolicy", "QuestPolicy", "BlockPolicy",
    "RetrievalPolicy", "RetroLMPolicy", "INDEX_KINDS", "BudgetTooSmallError",
]
