"""The mutation list of `make mutate` stays in step with the code (the run itself is not part of `make test`)."""

from __future__ import annotations

import dataclasses

from tests.mutate import run


def test_every_mutation_finds_its_text_exactly_once_and_names_existing_tests():
    assert run.check_list(run.MUTATIONS) == []
    assert len(run.MUTATIONS) >= 15


def test_a_stale_or_ambiguous_find_text_is_reported_by_name():
    first = run.MUTATIONS[0]
    gone = dataclasses.replace(first, name="gone", find="text that is nowhere in the file")
    twice = dataclasses.replace(first, name="twice", find="\n")
    problems = run.check_list((gone, twice))
    assert [p.split(":")[0] for p in problems] == ["gone", "twice"]
    assert "occurs 0 times" in problems[0]
