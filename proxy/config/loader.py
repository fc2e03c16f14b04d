"""Load the YAML policy file, reporting every problem with its line and column.

This module is the only user of ruamel.yaml in the project.  The document is
read with the round-trip loader, which records where every mapping key, value
and list item starts; the data is then converted to plain Python, validated by
the pydantic models, and each pydantic error is mapped back to a position:

* unknown key            -> the key
* missing required key   -> the mapping (or list item) that lacks it
* bad value              -> the value

Errors are raised as :class:`PolicyError`, whose ``issues`` are
:class:`PolicyIssue` values printing as ``FILE:LINE:COL: PATH: MESSAGE``.

String values may refer to the environment (``${NAME}``, ``${NAME:-default}``,
``$$``; see proxy/config/envrefs.py). They are expanded here, while the
positions are known: an unset variable is an error at its value (or, for a
check without the deployment's environment, a warning, and the errors that
value then causes are not reported). Values of variables that hold secrets
never appear in a message. :func:`read_policy` also returns the warnings of
a valid policy (proxy/config/lint.py), located like errors.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Union

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scalarfloat import ScalarFloat
from ruamel.yaml.scalarint import ScalarInt

from proxy.config.envrefs import expand, is_secret_name
from proxy.config.lint import policy_warnings
from proxy.config.models import Policy, dump_policy
from proxy.config.redact import redact_text
from proxy.options.units import (
    DURATION_PATTERN,
    PERCENT_PATTERN,
    SIZE_PATTERN,
    describe_value,
    format_duration,
    format_percent,
    format_size,
)

__all__ = [
    "PolicyIssue",
    "PolicyError",
    "PolicyDocument",
    "load_policy",
    "parse_policy",
    "read_policy",
    "read_policy_file",
    "dump_policy_yaml",
    "format_path",
]

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy file.

    ``line`` and ``col`` are 1-based; both are 0 when the problem is not in the
    text (e.g. the file cannot be read).  ``path`` is the dotted location
    (``routes[1].timeout``; empty for the document itself) and ``message`` says
    what is wrong and what to write instead.
    """

    source: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.col}" if self.line > 0 else self.source
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: {what}"

    def as_warning(self) -> str:
        """``FILE:LINE:COL: warning: PATH: MESSAGE``."""
        where = f"{self.source}:{self.line}:{self.col}" if self.line > 0 else self.source
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: warning: {what}"


class PolicyError(Exception):
    """A policy could not be loaded; ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues: list[PolicyIssue] = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


@dataclass(slots=True)
class PolicyDocument:
    """A read policy with what the loader learnt on the way.

    ``policy`` is None only when environment references were not required
    (``unset_env="warn"``) and the policy cannot be checked without them;
    ``warnings`` then says which. ``issue`` locates a problem found later
    (e.g. on this machine, by `fender validate --env`) at the line it comes from.
    """

    policy: Policy | None
    source: str
    warnings: list[PolicyIssue] = field(default_factory=list)
    sha256: str | None = None
    index: dict[Loc, _Place] = field(default_factory=dict, repr=False)

    def issue(self, at: Sequence[str | int], message: str) -> PolicyIssue:
        line, col = _position(tuple(at), "", self.index)
        return PolicyIssue(self.source, line, col, format_path(at), message)


# --------------------------------------------------------------------------- public functions


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` on any problem."""
    return load_policy_and_digest(path)[0]


def load_policy_and_digest(path: str | os.PathLike[str]) -> tuple[Policy, str]:
    """Like :func:`load_policy`, plus the sha256 of the file's bytes (reload compares it with the file)."""
    document = read_policy_file(path)
    assert document.policy is not None and document.sha256 is not None
    return document.policy, document.sha256


def read_policy_file(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, unset_env: str = "error"
) -> PolicyDocument:
    """Read and validate a policy file into a :class:`PolicyDocument` (see :func:`read_policy`)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PolicyError([PolicyIssue(source, 0, 0, "", f"cannot read the policy file: {reason}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError(
            [PolicyIssue(source, line, col, "", "the policy file is not valid UTF-8 text")]
        ) from None
    document = read_policy(text, source, environ, unset_env)
    document.sha256 = hashlib.sha256(raw).hexdigest()
    return document


def parse_policy(text: str, source: str = "<string>", environ: Mapping[str, str] | None = None) -> Policy:
    """Validate a policy given as YAML text; ``source`` names it in error messages."""
    policy = read_policy(text, source, environ).policy
    assert policy is not None  # environment references are required here
    return policy


def read_policy(
    text: str, source: str = "<string>", environ: Mapping[str, str] | None = None, unset_env: str = "error"
) -> PolicyDocument:
    """Validate a policy given as YAML text, with its warnings; raise :class:`PolicyError` on a problem.

    ``environ`` (default ``os.environ``) answers ``${NAME}`` references. ``unset_env="error"`` makes
    an unset variable without default an error at its value (run, reload, `validate --env`);
    ``"warn"`` makes it a warning, and errors located at such a value are left out (they depend on
    the missing variable), so a check without the deployment's environment can still pass.
    """
    converter = _Converter(source, {}, os.environ if environ is None else environ, unset_env == "warn")
    data, index = _read_yaml(text.removeprefix("\ufeff"), source, converter)
    scrub = converter.scrub
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        issues = [
            issue
            for issue in _issues_from(exc, index, source)
            if (issue.line, issue.col) not in converter.unresolved
        ]
        if issues:
            raise PolicyError([scrub(issue) for issue in issues]) from None
        return PolicyDocument(None, source, converter.warnings, index=index)
    policy._env_secrets = frozenset(converter.secrets)
    document = PolicyDocument(policy, source, list(converter.warnings), index=index)
    document.warnings += [scrub(document.issue(at, message)) for at, message in policy_warnings(policy)]
    document.warnings.sort(key=lambda issue: (issue.line, issue.col))
    return document


def dump_policy_yaml(policy: Policy) -> str:
    """The effective policy (defaults filled in) as YAML text in policy-file notation."""
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    out = io.StringIO()
    yaml.dump(dump_policy(policy), out)
    return out.getvalue()


def format_path(loc: Iterable[str | int]) -> str:
    """``("routes", 1, "timeout")`` -> ``routes[1].timeout``; odd keys are quoted: ``upstreams["a.b"]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


# --------------------------------------------------------------------------- YAML reading


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a node sits: ``key`` is its key (or list item) position, ``value`` its value position."""

    key: tuple[int, int]
    value: tuple[int, int]


def _read_yaml(
    text: str, source: str, converter: _Converter | None = None
) -> tuple[dict[str, Any], dict[Loc, _Place]]:
    converter = converter or _Converter(source, {}, os.environ)
    yaml = YAML(typ="rt")
    try:
        document = yaml.load(text)
    except MarkedYAMLError as exc:
        raise PolicyError([_yaml_issue(exc, source)]) from None
    except YAMLError as exc:
        line, col = _offset_position(text, getattr(exc, "position", 0))
        raise PolicyError([PolicyIssue(source, line, col, "", f"cannot read the YAML: {exc}")]) from None

    if document is None:
        raise PolicyError(
            [
                PolicyIssue(
                    source,
                    1,
                    1,
                    "",
                    "the policy is empty; it needs at least an `upstreams:` and a `routes:` section",
                )
            ]
        )
    if not isinstance(document, CommentedMap):
        line, col = _node_start(document)
        raise PolicyError(
            [
                PolicyIssue(
                    source,
                    line,
                    col,
                    "",
                    f"the top level must be a mapping of keys (listen:, upstreams:, routes:, ...), "
                    f"got {describe_value(_plain_scalar(document))}",
                )
            ]
        )
    data = converter.convert(document, (), (1, 1), (1, 1))
    if converter.issues:
        issues = sorted(converter.issues, key=lambda issue: (issue.line, issue.col))
        raise PolicyError([converter.scrub(issue) for issue in issues])
    return data, converter.index


def _node_start(node: Any) -> tuple[int, int]:
    lc = getattr(node, "lc", None)
    if lc is not None and lc.line is not None:
        return lc.line + 1, lc.col + 1
    return 1, 1


def _offset_position(text: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset or 0, len(text)))
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def _yaml_issue(exc: MarkedYAMLError, source: str) -> PolicyIssue:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = (exc.problem or "").strip()
    if isinstance(exc, DuplicateKeyError):
        found = re.search(r'duplicate key "(.*?)" with value', problem)
        key = found.group(1) if found else "?"
        message = (
            f'duplicate key "{key}" (a key may appear only once in a mapping; remove or merge one of them)'
        )
        return PolicyIssue(source, line, col, "", message)
    message = f"invalid YAML: {problem or 'syntax error'}"
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        context = exc.context.strip()
        message += (
            f" ({context} started at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        )
    elif exc.context:
        message += f" ({exc.context.strip()})"
    if "'\\t'" in problem or "\t" in problem:
        message += "; indent with spaces, not tabs"
    return PolicyIssue(source, line, col, "", message)


# Aliases may repeat a subtree many times; the converted policy never needs more nodes than this.
_MAX_NODES = 200_000


class _Converter:
    """Convert ruamel's round-trip nodes to plain Python, recording positions in ``index``."""

    def __init__(
        self, source: str, index: dict[Loc, _Place], environ: Mapping[str, str], unset_warns: bool = False
    ) -> None:
        self.source = source
        self.index = index
        self.issues: list[PolicyIssue] = []
        self.nodes = 0
        self.active: set[int] = set()  # containers being converted (to spot recursive aliases)
        self.environ = environ
        self.unset_warns = unset_warns
        self.warnings: list[PolicyIssue] = []
        self.unresolved: set[tuple[int, int]] = set()  # positions of values missing a variable
        self.secrets: set[str] = set()  # values from the environment that messages must not show

    def problem(self, loc: Loc, pos: tuple[int, int], message: str) -> None:
        self.issues.append(PolicyIssue(self.source, pos[0], pos[1], format_path(loc), message))

    def scrub(self, issue: PolicyIssue) -> PolicyIssue:
        """The issue with every secret value from the environment, and URL passwords, replaced by ***."""
        message = redact_text(issue.message)
        for secret in sorted(self.secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        if message == issue.message:
            return issue
        return PolicyIssue(issue.source, issue.line, issue.col, issue.path, message)

    def expand(self, text: str, loc: Loc, pos: tuple[int, int]) -> str | None:
        """``text`` with its environment references replaced (None: a malformed reference)."""
        result = expand(text, self.environ)
        if result.error is not None:
            self.problem(loc, pos, result.error)
            return None
        key = next((part for part in reversed(loc) if isinstance(part, str)), "")
        for name, value in result.used.items():
            if value and (is_secret_name(name) or is_secret_name(key)):
                self.secrets.add(value)
        for name in result.missing:
            message = (
                f"environment variable {name} is not set (set it, or give a default: ${{{name}:-default}})"
            )
            if self.unset_warns:
                issue = PolicyIssue(self.source, pos[0], pos[1], format_path(loc), message)
                self.warnings.append(issue)
                self.unresolved.add(pos)
            else:
                self.problem(loc, pos, message)
        return result.text

    def convert(self, node: Any, loc: Loc, key_pos: tuple[int, int], value_pos: tuple[int, int]) -> Any:
        self.index[loc] = _Place(key_pos, value_pos)
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            if self.nodes == _MAX_NODES + 1:
                self.problem(
                    loc, value_pos, f"the policy is too large (more than {_MAX_NODES} values after aliases)"
                )
            return None
        if not isinstance(node, CommentedMap | CommentedSeq):
            if isinstance(node, str) and _not_unicode(node):
                self.problem(loc, value_pos, _SURROGATE)
                return None
            if isinstance(node, str) and "$" in node:
                return self.expand(str(node), loc, value_pos)
            return _plain_scalar(node)
        if id(node) in self.active:
            self.problem(
                loc, value_pos, "an alias refers to a mapping or list that contains it (recursive alias)"
            )
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, CommentedMap):
                return self._mapping(node, loc, value_pos)
            return self._sequence(node, loc, value_pos)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: CommentedMap, loc: Loc, value_pos: tuple[int, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for raw_key, value in node.items():
            try:
                key_line, key_col = node.lc.key(raw_key)
                child_key = (key_line + 1, key_col + 1)
            except (KeyError, TypeError):  # merged (<<) keys have no position of their own
                child_key = value_pos
            try:
                value_line, value_col = node.lc.value(raw_key)
                child_value = (value_line + 1, value_col + 1)
            except (KeyError, TypeError):
                child_value = child_key
            if value is None and child_value[0] != child_key[0]:
                child_value = child_key  # `key:` with nothing after it: point at the key
            if not isinstance(raw_key, str):
                shown = describe_value(_plain_scalar(raw_key))
                if isinstance(raw_key, int | float) and not isinstance(raw_key, bool):
                    shown += f' (put it in quotes: "{shown}")'
                self.problem(loc, child_key, f"keys must be text, got {shown}")
                continue
            key = str(raw_key)
            if _not_unicode(key):
                self.problem(loc, child_key, _SURROGATE)
                continue
            out[key] = self.convert(value, (*loc, key), child_key, child_value)
        return out

    def _sequence(self, node: CommentedSeq, loc: Loc, value_pos: tuple[int, int]) -> list[Any]:
        items: list[Any] = []
        for position, value in enumerate(node):
            try:
                item_line, item_col = node.lc.item(position)
                item_pos = (item_line + 1, item_col + 1)
            except (KeyError, TypeError, IndexError):
                item_pos = value_pos
            items.append(self.convert(value, (*loc, position), item_pos, item_pos))
        return items


_SURROGATE = r"not valid Unicode text: it holds a lone surrogate (an escape like \ud800)"


def _not_unicode(text: str) -> bool:
    """YAML's \ud800-style escapes can make strings no encoder (nor error message) can handle."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, ScalarBoolean):
        return bool(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, ScalarInt):
        return int(value)
    if isinstance(value, ScalarFloat):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, CommentedMap):
        return dict(value)
    if isinstance(value, CommentedSeq):
        return list(value)
    return value


# --------------------------------------------------------------------------- pydantic errors


def _issues_from(exc: ValidationError, index: dict[Loc, _Place], source: str) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    for error in exc.errors(include_url=False):
        loc: Loc = _without_union_tags(tuple(error["loc"]), index)
        ctx = error.get("ctx") or {}
        if "fender_issues" in ctx:
            located = [((*loc, *at), message) for at, message in ctx["fender_issues"]]
        elif "fender_at" in ctx:
            located = [((*loc, *ctx["fender_at"]), error["msg"])]
        else:
            located = [(loc, _friendly(error, loc))]
        for where, message in located:
            line, col = _position(where, error["type"], index)
            path = format_path(part for part in where if part != "[key]")
            issues.append(PolicyIssue(source, line, col, path, message))
    unique = list(dict.fromkeys(issues))
    unique.sort(key=lambda issue: (issue.line, issue.col))
    return unique


def _without_union_tags(loc: Loc, index: dict[Loc, _Place]) -> Loc:
    """pydantic puts a tagged union's branch name in the location (``rate_limit.limit.rate``); it
    is not in the file, so drop a part the file does not have when the rest of the path is there."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        here = (*out, part)
        if isinstance(part, str) and here not in index and tuple(out) in index:
            rest = loc[i + 1 : i + 2]
            if rest and (*out, *rest) in index:
                continue
        out.append(part)
    return tuple(out)


def _position(loc: Loc, error_type: str, index: dict[Loc, _Place]) -> tuple[int, int]:
    want_key = error_type == "extra_forbidden"
    if loc and loc[-1] == "[key]":
        loc, want_key = loc[:-1], True
    if error_type == "missing":
        loc, want_key = loc[:-1], True
    for length in range(len(loc), -1, -1):
        place = index.get(loc[:length])
        if place is not None:
            if want_key or length < len(loc):
                return place.key
            return place.value
    return 1, 1


# Each formatter takes the number its unit's fields hold (a size an int, a duration a float).
_UNIT_FORMATS: tuple[tuple[re.Pattern[str], Callable[[Any], str]], ...] = (
    (re.compile(DURATION_PATTERN), format_duration),
    (re.compile(SIZE_PATTERN), format_size),
    (re.compile(PERCENT_PATTERN), format_percent),
)


def _bound(value: Any, raw_input: Any) -> str:
    """Show a numeric bound in the same notation as the value the user wrote."""
    if isinstance(raw_input, str) and isinstance(value, int | float):
        for pattern, formatter in _UNIT_FORMATS:
            if pattern.fullmatch(raw_input):
                return formatter(value)
    return describe_value(value)


def _friendly(error: Any, loc: Loc) -> str:
    kind: str = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    got = describe_value(value)

    if kind == "fender_policy":
        return error["msg"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        model = _model_at(loc[:-1])
        if model is None:
            return f'unknown key "{key}"'
        allowed = list(model.model_fields)
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        return f'unknown key "{key}" ({hint}allowed: {", ".join(allowed)})'
    if kind == "missing":
        return f'missing required key "{loc[-1]}"' if loc else "missing required key"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return f"expected a whole number, got text {got} (write it without quotes: {value.strip()})"
        return f"expected a whole number, got {got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {got}"
    if kind in ("string_type", "string_sub_type"):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f'expected text, got the number {got} (put it in quotes: "{got}")'
        return f"expected text, got {got}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {got}"
    if kind in ("list_type", "tuple_type", "iterable_type", "set_type"):
        if isinstance(value, str):
            return f"expected a list, got {got} (write it as [{value}])"
        return f"expected a list, got {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "dataclass_type"):
        return f"expected a mapping (key: value lines), got {got}"
    if kind == "greater_than":
        return f"must be greater than {_bound(ctx.get('gt'), value)}, got {got}"
    if kind == "greater_than_equal":
        return f"must be at least {_bound(ctx.get('ge'), value)}, got {got}"
    if kind == "less_than":
        return f"must be less than {_bound(ctx.get('lt'), value)}, got {got}"
    if kind == "less_than_equal":
        return f"must be at most {_bound(ctx.get('le'), value)}, got {got}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"allows at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {got}"
    if kind == "string_pattern_mismatch":
        return f"{got} does not match the pattern {ctx.get('pattern')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if isinstance(value, date):
        return f"{error['msg']} (got a date; put it in quotes if it is meant as text)"
    return str(error["msg"])


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The policy model that validates the mapping at ``loc`` (for listing its allowed keys)."""
    current: Any = Policy
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin in (list, tuple, set, frozenset) and args:
            current = args[0]
        elif origin is dict and len(args) == 2:
            current = args[1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
            models = [
                m for m in members if isinstance(_unwrap(m), type) and issubclass(_unwrap(m), BaseModel)
            ]
            tp = models[0] if models else (members[0] if members else tp)
            if not models:
                return tp
        else:
            return tp
