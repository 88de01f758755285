"""VERL ``external_lib`` that registers lckv's attention backend on import.

VERL imports ``actor_rollout_ref.model.external_lib`` in every worker before it builds the model
config; with ``+actor_rollout_ref.model.override_config.attn_implementation=lckv`` the actor
(and reference) model then run their forward passes through ``"lckv"``. Without a cache (a
training forward) lckv applies the policy as an attention mask, so the actor is trained under the
same KV compression it will be served with.

The policy comes from the environment, read once at import:

* ``LCKV_TRAIN_POLICY`` — a registered lckv policy name, e.g. ``full`` or ``streaming``
  (default ``full``);
* ``LCKV_TRAIN_POLICY_SETTINGS`` — the policy's settings as comma-separated ``key=value``
  pairs, e.g. ``sink=64,window=4096`` (values are parsed as JSON numbers/booleans when they
  can be, else kept as strings; default: none).

Set them where the workers start (the launch script exports them; on a multi-node Ray cluster
also pass them in ``ray_kwargs.ray_init.runtime_env.env_vars``, as ``grpo_lckv.yaml`` does).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from lckv.integrations.hf import ATTENTION_NAME, register

__all__ = ["POLICY_ENV", "SETTINGS_ENV", "parse_settings", "register_from_env", "ATTENTION_NAME"]

POLICY_ENV = "LCKV_TRAIN_POLICY"
SETTINGS_ENV = "LCKV_TRAIN_POLICY_SETTINGS"


def parse_settings(raw: str) -> dict:
    """``"sink=64,window=4096"`` -> ``{"sink": 64, "window": 4096}``."""
    settings = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{SETTINGS_ENV} must be comma-separated key=value pairs such as "
                             f"'sink=64,window=4096', got {raw!r}")
        try:
            settings[key.strip()] = json.loads(value.strip())
        except ValueError:
            settings[key.strip()] = value.strip()
    return settings


def register_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, dict]:
    """Registers ``"lckv"`` with the policy named by the environment; returns ``(name, settings)``."""
    environ = os.environ if environ is None else environ
    name = environ.get(POLICY_ENV, "full").strip() or "full"
    settings = parse_settings(environ.get(SETTINGS_ENV, ""))
    register(name, **settings)
    return name, settings


POLICY, POLICY_SETTINGS = register_from_env()
