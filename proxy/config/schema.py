"""JSON Schema of the policy file, for editors and for ``policies/schema.json``."""

from __future__ import annotations

import json
from typing import Any

from proxy.config.models import Policy

__all__ = ["SCHEMA_ID", "policy_json_schema", "schema_text"]

SCHEMA_ID = "https://fender.dev/schema/policy.json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def policy_json_schema() -> dict[str, Any]:
    """The policy's JSON Schema (draft 2020-12), built from the models and their descriptions."""
    body = Policy.model_json_schema(mode="validation")
    schema: dict[str, Any] = {
        "$schema": _DIALECT,
        "$id": SCHEMA_ID,
        "title": "Fender policy",
    }
    schema.update({key: value for key, value in body.items() if key != "title"})
    return schema


def schema_text() -> str:
    """The schema as stable, pretty JSON text (sorted keys, trailing newline)."""
    return json.dumps(policy_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
