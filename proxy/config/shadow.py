"""Routes that can never match: every request they would take goes to an earlier route.

Routing is first match in file order (proxy/dataplane/router.py). A route is
*shadowed* when each request it matches is matched by some earlier route. The
check mirrors the router's conditions exactly:

* path: ``path_prefix`` (string prefix), ``path`` (equality), ``path_regex`` (fullmatch);
* host: equality, or ``*.suffix`` (ends with ``.suffix``, something before it);
* methods: membership (empty: any); headers: a field with that name and value.

The conditions are a conjunction of one predicate per dimension, so requests
fall into finitely many classes with respect to the routes involved. For each
dimension the check builds one representative per class from the literals the
routes use (a literal, the literal plus a character no literal has, ...), and
tries every combination that the route itself matches against the earlier
routes that overlap it. The answer is exact for prefix, exact-path, host,
method and header conditions. A regular expression cannot be enumerated: an
earlier regex is taken to match only the exact paths it fullmatches, and a
regex route is covered only by an earlier route matching every path ("/"
prefix) or the same regex; so with regexes the check may miss a shadowed
route but never reports a reachable one. The enumeration is bounded
(:data:`MAX_COMBINATIONS` requests per route, :data:`MAX_WORK` request-route
tests for the whole policy, so a reload of a large policy stays fast); beyond
it only single earlier routes that cover the whole route are found.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

__all__ = ["shadowed_routes", "MAX_COMBINATIONS", "MAX_WORK"]

MAX_COMBINATIONS = 4096
MAX_WORK = 1_000_000

# A character no path, host, method or header value in a policy contains (the policy refuses
# "#" in paths and hosts; header values are compared whole): appending it leaves a literal's class.
_FRESH = "#"


def shadowed_routes(routes: Sequence) -> list[tuple[int, list[int]]]:
    """``(index, [indexes of the earlier routes that take its requests])`` for each shadowed route."""
    out = []
    budget = [MAX_WORK]  # request-route tests left for the enumeration, shared by all routes
    for index, route in enumerate(routes):
        match = route.match
        earlier = [i for i in range(index) if _overlaps(routes[i].match, match)]
        if not earlier:
            continue
        covering = next((i for i in earlier if _covers(routes[i].match, match)), None)
        if covering is not None:
            out.append((index, [covering]))
            continue
        takers = _taken_by(match, [(i, routes[i].match) for i in earlier], budget)
        if takers is not None:
            out.append((index, takers))
    return out


# --------------------------------------------------------------------------- one route against one


def _path_kind(match) -> tuple[str, str]:
    if match.path is not None:
        return "exact", match.path
    if match.path_regex is not None:
        return "regex", match.path_regex
    return "prefix", match.path_prefix or "/"


def _host_covers(a: str | None, b: str | None) -> bool:
    if a is None:
        return True
    if b is None:
        return False
    if a.startswith("*."):
        suffix = a[1:]
        return b.endswith(suffix) and len(b) > len(suffix)  # "*.x.example.com" too
    return a == b


def _covers(a, b) -> bool:
    """Does every request matching ``b`` match ``a``? (Exact for everything but regexes.)"""
    kind_a, path_a = _path_kind(a)
    kind_b, path_b = _path_kind(b)
    if kind_a == "prefix":
        if kind_b == "regex":
            path_ok = path_a == "/"
        else:
            path_ok = path_b.startswith(path_a)
    elif kind_a == "exact":
        path_ok = kind_b == "exact" and path_a == path_b
    else:
        path_ok = (kind_b == "regex" and path_a == path_b) or (
            kind_b == "exact" and a.regex.fullmatch(path_b) is not None
        )
    if not path_ok or not _host_covers(a.host, b.host):
        return False
    if a.methods and not (b.methods and set(b.methods) <= set(a.methods)):
        return False
    return all(b.headers.get(name) == value for name, value in a.headers.items())


def _overlaps(a, b) -> bool:
    """Could one request match both? (False only when certainly not; header values never exclude:
    a request may carry the same field twice with different values.)"""
    kind_a, path_a = _path_kind(a)
    kind_b, path_b = _path_kind(b)
    if kind_a != "regex" and kind_b != "regex":
        if kind_a == "exact" and kind_b == "exact":
            if path_a != path_b:
                return False
        elif kind_a == "exact":
            if not path_a.startswith(path_b):
                return False
        elif kind_b == "exact":
            if not path_b.startswith(path_a):
                return False
        elif not (path_a.startswith(path_b) or path_b.startswith(path_a)):
            return False
    if a.methods and b.methods and not set(a.methods) & set(b.methods):
        return False
    if a.host and b.host and not (_host_covers(a.host, b.host) or _host_covers(b.host, a.host)):
        if not (a.host.startswith("*.") and b.host.startswith("*.")):
            return False
    return True


# --------------------------------------------------------------------------- representatives

# A path representative: (text, whether it stands for that one path only, the regex it stands for).
_Path = tuple[str, bool, str | None]


def _paths(route, others) -> list[_Path]:
    kind, text = _path_kind(route)
    if kind == "regex":
        return [("", False, text)]  # "some path this regex matches"
    if kind == "exact":
        return [(text, True, None)]
    exact = {m.path for m in (route, *others) if m.path is not None}
    literals = {text}
    for other in others:
        other_kind, other_text = _path_kind(other)
        if other_kind != "regex" and other_text.startswith(text):
            literals.add(other_text)
    reps = {(literal, literal in exact, None) for literal in literals}
    reps |= {(literal + _FRESH, False, None) for literal in literals}
    return sorted(reps)


def _path_matches(match, path: _Path) -> bool:
    text, single, regex = path
    kind, wanted = _path_kind(match)
    if regex is not None:
        return (kind == "prefix" and wanted == "/") or (kind == "regex" and wanted == regex)
    if kind == "prefix":
        return text.startswith(wanted)
    if kind == "exact":
        return text == wanted
    # A regex is tested only on a representative that is one path; otherwise it is taken not to
    # match (the check may then miss a shadowed route, never report a reachable one).
    return single and match.regex.fullmatch(text) is not None


def _hosts(route, others) -> list[str]:
    if route.host is not None and not route.host.startswith("*."):
        return [route.host]
    candidates = {_FRESH}
    for m in (route, *others):
        if m.host is None:
            continue
        candidates.add(_FRESH + m.host[1:] if m.host.startswith("*.") else m.host)
    if route.host is None:
        return sorted(candidates)
    return sorted(h for h in candidates if _host_covers(route.host, h))


def _methods(route, others) -> list[str]:
    if route.methods:
        return sorted(route.methods)
    return sorted({_FRESH, *(method for m in others for method in m.methods)})


def _header_choices(route, others) -> list[tuple[str, list[frozenset[str]]]] | None:
    """Per header name the others test: the sets of its tested values a request may carry.

    None when there are too many to try (2**values per name, bounded before they are built).
    """
    names = sorted({name for m in others for name in m.headers})
    choices = []
    total = 1
    for name in names:
        values = sorted({m.headers[name] for m in (route, *others) if name in m.headers})
        total *= 2 ** len(values)
        if total > MAX_COMBINATIONS:
            return None
        subsets = [
            frozenset(combo)
            for size in range(len(values) + 1)
            for combo in itertools.combinations(values, size)
        ]
        if name in route.headers:
            subsets = [subset for subset in subsets if route.headers[name] in subset]
        choices.append((name, subsets))
    return choices


def _matches(match, path: _Path, host: str, method: str, headers: dict[str, frozenset[str]]) -> bool:
    if not _path_matches(match, path):
        return False
    if match.methods and method not in match.methods:
        return False
    if match.host is not None and not _host_covers(match.host, host):
        return False
    return all(value in headers.get(name, ()) for name, value in match.headers.items())


def _taken_by(route, earlier: list[tuple[int, object]], budget: list[int]) -> list[int] | None:
    """The earlier routes that together take every request ``route`` matches, or None."""
    others = [m for _, m in earlier]
    header_choices = _header_choices(route, others)
    if header_choices is None:
        return None
    # One list of choices per dimension: paths, hosts, methods, then each header's value sets.
    dimensions: list[Sequence[Any]] = [_paths(route, others), _hosts(route, others), _methods(route, others)]
    dimensions += [values for _, values in header_choices]
    total = 1
    for dimension in dimensions:
        total *= len(dimension)
        if total > MAX_COMBINATIONS:
            return None
    if total * len(earlier) > budget[0]:
        return None
    budget[0] -= total * len(earlier)
    names = [name for name, _ in header_choices]
    takers: set[int] = set()
    for path, host, method, *values in itertools.product(*dimensions):
        headers = dict(zip(names, values, strict=True))
        for index, other in earlier:
            if _matches(other, path, host, method, headers):
                takers.add(index)
                break
        else:
            return None  # this request reaches the route
    return sorted(takers)
