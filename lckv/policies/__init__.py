"""Selection policies and their registry.

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

__all__ = [
    "Policy", "PolicyConfigError", "available_policies", "get_policy", "register_policy", "resolve_policy",
    "FullPolicy", "StreamingPolicy",
]
