"""Generated documentation: the policy reference (docs/reference.md), policies/schema.json, and the
site's home page (docs/index.md, the README with its links made relative to docs/).

The models' field descriptions are the documentation; this renders them as
one table per section of the policy. ``python -m proxy.docs --write`` (run by
``make schema``) rewrites both files; a test fails when either is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from proxy.config import policy_json_schema, schema_text

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "reference.md"
INDEX = ROOT / "docs" / "index.md"
SCHEMA = ROOT / "policies" / "schema.json"
START = "<!-- policy-reference:start -->"
END = "<!-- policy-reference:end -->"


def _type_of(prop: dict, defs: dict) -> tuple[str, str | None, str]:
    """(type text, nested $def name or None, suffix for the nested section path)."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        target = defs.get(name, {})
        if "properties" not in target:  # a scalar type with its own definition (e.g. host:port)
            return _type_of(target, defs)
        return "section", name, ""
    if "oneOf" in prop:
        options = prop["oneOf"]
        if all("type" in o and o["type"] in ("string", "integer", "number", "boolean") for o in options):
            return " or ".join(o["type"] for o in options), None, ""  # e.g. a status code or a name
        return _type_of(options[0], defs)  # one mapping or a list of them: document the first
    for option in prop.get("anyOf", []):
        if option.get("type") != "null":
            text, nested, suffix = _type_of(option, defs)
            return text + " or null", nested, suffix
    kind = prop.get("type", "any")
    if kind == "array":
        text, nested, suffix = _type_of(prop.get("items", {}), defs)
        return f"list of {text}", nested, "[]" + suffix
    if kind == "object":
        values = prop.get("additionalProperties")
        if not isinstance(values, dict) and prop.get("patternProperties"):
            values = next(iter(prop["patternProperties"].values()))
        if isinstance(values, dict):
            text, nested, suffix = _type_of(values, defs)
            return f"map of name to {text}", nested, ".<name>" + suffix
    if kind == "string" and "pattern" in prop and prop.get("examples"):
        return f"string, e.g. `{prop['examples'][0]}`", None, ""
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"]), None, ""
    return kind, None, ""


def _default(prop: dict, required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if isinstance(value, dict | list):
        return "`" + json.dumps(value, separators=(", ", ": ")) + "`" if value else "empty"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`" + str(value).lower() + "`"
    return f"`{value}`"


def render_reference(schema: dict | None = None) -> str:
    schema = schema or policy_json_schema()
    defs = schema.get("$defs", {})
    sections: list[str] = []
    queue: list[tuple[str, dict]] = [("(top level)", schema)]
    seen: set[str] = set()
    while queue:
        path, model = queue.pop(0)
        props = model.get("properties", {})
        required = set(model.get("required", []))
        lines = [f"### `{path}`" if path != "(top level)" else "### Top level", ""]
        if model.get("description") and path != "(top level)":
            lines += [model["description"], ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, prop in props.items():
            text, nested, suffix = _type_of(prop, defs)
            description = prop.get("description", "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{key}` | {text} | {_default(prop, key in required)} | {description} |")
            if nested and nested not in seen and "properties" in defs.get(nested, {}):
                seen.add(nested)
                child = f"{key}{suffix}" if path == "(top level)" else f"{path}.{key}{suffix}"
                queue.append((child, defs[nested]))
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def readme_with_reference(readme: str, reference: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference}{END}{tail}"


def site_index(readme: str) -> str:
    """docs/index.md: the README, whose links into docs/ become links between pages of the site."""
    text = readme.replace("](docs/", "](")
    return "<!-- generated from README.md by `make schema`: edit the README -->\n" + text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--write",
        action="store_true",
        help="rewrite docs/reference.md, docs/index.md and policies/schema.json",
    )
    args = parser.parse_args(argv)
    reference = render_reference()
    if not args.write:
        sys.stdout.write(reference)
        return 0
    REFERENCE.write_text(readme_with_reference(REFERENCE.read_text(), reference))
    INDEX.write_text(site_index(README.read_text()))
    SCHEMA.write_text(schema_text())
    print(f"wrote {SCHEMA.relative_to(ROOT)}, {REFERENCE.relative_to(ROOT)} and {INDEX.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
