"""``gateway/responses/fields.py`` decides everything OpenAI's ``CreateResponse`` lets a client set, and no more.

The things are derived from the vendored spec by ``tests/responses_fields.py``; a newer spec
with a new field, tool, item or value fails here, naming it, until ``FIELDS`` decides it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.responses.fields import FIELDS, Outcome
from tests import responses_fields
from tests.responses_fields import REGENERATE, render, things, undecided, unknown


def check_decided(fields: dict[str, Any]) -> None:
    missing = undecided(fields)
    assert not missing, f"things OpenAI's CreateResponse has that gateway/responses/fields.py does not decide: {missing}"


def check_known(fields: dict[str, Any]) -> None:
    extra = unknown(fields)
    assert not extra, f"things gateway/responses/fields.py decides that OpenAI's CreateResponse lacks: {extra}"


def test_every_thing_the_spec_lets_a_client_set_is_decided() -> None:
    check_decided(FIELDS)


def test_nothing_is_decided_that_the_spec_lacks() -> None:
    check_known(FIELDS)


def test_the_checked_in_table_is_what_the_decisions_render() -> None:
    assert responses_fields.CHECKED_IN.exists(), f"no {responses_fields.CHECKED_IN}; generate it: {REGENERATE}"
    assert responses_fields.CHECKED_IN.read_text() == render(), (
        f"openapi/responses-fields.md is stale; regenerate it: {REGENERATE}")


@pytest.mark.parametrize("thing", ["reasoning.effort", "tools[type=web_search]", "input[type=item_reference]",
                                   "include=reasoning.encrypted_content", "background=true"])
def test_a_decision_taken_away_is_named(thing: str) -> None:
    fields = {k: v for k, v in FIELDS.items() if k != thing}
    with pytest.raises(AssertionError) as failure:
        check_decided(fields)
    assert f"['{thing}']" in str(failure.value)


def test_a_decision_about_nothing_is_named() -> None:
    with pytest.raises(AssertionError, match=r"\['tools\[type=telepathy\]'\]"):
        check_known({**FIELDS, "tools[type=telepathy]": (Outcome.REFUSED, "No such tool.")})


def test_what_a_newer_spec_adds_is_undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    """The things come from the spec, not from a list: a new member, field or value shows up."""
    defs = copy.deepcopy(responses_fields._defs())
    defs["Tool"]["oneOf"].append({"type": "object", "properties": {"type": {"type": "string", "enum": ["telepathy"]}}})
    defs["IncludeEnum"]["enum"].append("telepathy_call.thoughts")
    defs["Reasoning"]["properties"]["depth"] = {"type": "integer"}
    defs["CreateResponse"]["allOf"][-1]["properties"]["mood"] = {"type": "string", "enum": ["calm", "terse"]}
    defs["InputContent"]["oneOf"].append({"type": "object", "properties": {"type": {"type": "string",
                                                                                    "enum": ["input_smell"]}}})
    monkeypatch.setattr(responses_fields, "_defs", lambda: defs)
    assert undecided(FIELDS) == ["reasoning.depth", "mood=calm", "mood=terse", "tools[type=telepathy]",
                                 "include=telepathy_call.thoughts", "input.content[type=input_smell]"]
    assert unknown(FIELDS) == []


def test_the_derivation_finds_what_the_brief_names() -> None:
    """A walker that found nothing would pass the checks above: these must be among its things."""
    found = things()
    assert len(found) >= 150
    assert {"model", "input", "instructions", "text.format", "text.verbosity", "reasoning.effort",
            "reasoning.summary", "reasoning.generate_summary", "stream_options.include_obfuscation",
            "prompt_cache_options.ttl", "tools[type=function]", "tools[type=web_search]", "tools[type=mcp]",
            "input[type=message]", "input[type=function_call]", "input[type=function_call_output]",
            "input[type=reasoning]", "input[type=item_reference]", "input.content[type=input_text]",
            "input.content[type=input_image]", "input.content[type=input_file]", "input.content[type=output_text]",
            "input.content[type=refusal]", "include=reasoning.encrypted_content", "include=message.output_text.logprobs",
            "tool_choice=auto", "tool_choice[type=function]", "tool_choice[type=allowed_tools]",
            "text.format[type=text]", "text.format[type=json_object]", "text.format[type=json_schema]",
            "truncation=auto", "background=true", "store=true"} <= found.keys()


def test_every_tool_but_functions_and_every_tool_choice_naming_one_is_refused() -> None:
    tools = {k: v[0] for k, v in FIELDS.items() if k.startswith("tools[type=") and "]." not in k}
    assert {k for k, v in tools.items() if v is not Outcome.REFUSED} == {"tools[type=function]"}
    choices = {k: v[0] for k, v in FIELDS.items() if k.startswith("tool_choice[type=")}
    assert {k for k, v in choices.items() if v is not Outcome.REFUSED} == {"tool_choice[type=function]"}


def test_each_decision_is_an_outcome_with_a_sentence() -> None:
    for thing, (outcome, reason) in FIELDS.items():
        assert isinstance(outcome, Outcome), thing
        assert len(reason) > 10 and reason == reason.strip() and reason.endswith("."), f"{thing}: {reason!r}"


def test_the_command_tells_a_stale_table_and_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "responses-fields.md"
    stale.write_text(render().replace("| refused |", "| ignored |", 1))
    monkeypatch.setattr(responses_fields, "CHECKED_IN", stale)
    assert responses_fields.main([]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert responses_fields.main(["--write"]) == 0
    assert responses_fields.main([]) == 0
    assert stale.read_text() == render()


def test_the_table_says_which_spec_it_was_made_from() -> None:
    source = responses_fields.spec_commit()
    assert source.startswith("openai/openai-openapi openapi.json at commit "), source
    assert f"({source})" in render()
