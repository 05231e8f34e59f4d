"""Meta tools as a model uses them: definitions for each framework, and real SDK response objects (built
without a network) dispatched through handle_tool_calls against a real session."""
from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic.types import Message
from langchain_core.tools import StructuredTool
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from workbench import AsyncWorkbench, Session, Workbench, WorkbenchError
from workbench.agent import NAMES
from workbench.agent.meta import clean_schema
from workbench.agent.search import ToolIndex
from workbench.tools import ToolContext, ToolRegistry

CONTACTS = 3_000
LIMIT = 8_000


@pytest.fixture(scope="module")
def agent(wb: Workbench) -> Iterator[Session]:
    if "AGT_CRM_LIST_CONTACTS" not in wb.tools:

        @wb.tool(slug="AGT_CRM_LIST_CONTACTS", toolkit="agt_crm")
        def list_contacts(country: str = "FR") -> list[dict]:
            """List the contacts of the CRM, with their city and yearly revenue."""
            return [{"id": i, "name": f"contact {i}", "city": ["Lyon", "Paris", "Nice"][i % 3], "country": country,
                     "revenue": i * 10} for i in range(CONTACTS)]

        @wb.tool(slug="AGT_CRM_GET_CONTACT", toolkit="agt_crm")
        def get_contact(contact_id: int) -> dict:
            """Get one contact of the CRM by its id."""
            return {"id": contact_id, "name": f"contact {contact_id}"}

        @wb.tool(slug="agt.mail.send", toolkit="agt_mail")
        def send_mail(to: str, subject: str, context: ToolContext) -> dict:
            """Send an email message to one recipient."""
            return {"sent": True, "to": to, "correlation": context.metadata.get("x-correlation-id")}

        @wb.tool(slug="AGT_FAILS", toolkit="agt_crm")
        def fails() -> None:
            """A tool whose service is down."""
            raise RuntimeError("service unavailable")

    s = wb.create("agent-user", toolkits=["agt_crm", "agt_mail"], metadata={"x-correlation-id": "corr-42"})
    yield s
    s.close(delete_workspace=True)


def _chat(*calls: tuple[str, str, Any]) -> ChatCompletion:
    return ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                for cid, name, args in calls]}}]})


def _claude(*calls: tuple[str, str, Any]) -> Message:
    return Message.model_validate({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test", "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
        "content": [{"type": "text", "text": "Let me look."},
                    *[{"type": "tool_use", "id": cid, "name": name, "input": args} for cid, name, args in calls]]})


def _responses(*calls: tuple[str, str, Any]) -> Response:
    return Response.model_validate({
        "id": "resp_1", "object": "response", "created_at": 1_700_000_000, "model": "gpt-test",
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "output": [{"type": "function_call", "id": f"fc_{cid}", "call_id": cid, "name": name,
                    "arguments": json.dumps(args), "status": "completed"} for cid, name, args in calls]})


MULTI = ("WORKBENCH_MULTI_EXECUTE_TOOL", {"tools": [
    {"tool_slug": "AGT_CRM_LIST_CONTACTS", "arguments": {"country": "FR"}},
    {"tool_slug": "AGT_CRM_GET_CONTACT", "arguments": {"contact_id": 7}},
    {"tool_slug": "AGT_FAILS", "arguments": {}},
    {"tool_slug": "AGT_NOT_ALLOWED", "arguments": {}},
]})


def _offload_id(answer: str) -> str:
    results = json.loads(answer)["results"]
    listed, got, failed, unknown = results
    assert listed["ok"] and listed["offload"]["records"] == CONTACTS
    assert listed["offload"]["columns"]["revenue"] == "int64"
    assert got == {"tool_slug": "AGT_CRM_GET_CONTACT", "ok": True, "data": {"id": 7, "name": "contact 7"}}
    assert failed["ok"] is False and failed["error_kind"] == "tool_error" and "unavailable" in failed["error"]
    assert unknown["ok"] is False and unknown["error_kind"] == "not_found"
    return listed["offload"]["id"]


CELL = 'df = tables["{rid}"]\nprint(len(df))\ndf.groupby("city").revenue.sum().to_dict()'
EXPECTED = {city: sum(i * 10 for i in range(CONTACTS) if i % 3 == n) for n, city in enumerate(["Lyon", "Paris", "Nice"])}


def _cell_answer(answer: str) -> None:
    assert answer.startswith(f"stdout:\n{CONTACTS}\nresult:\n")
    assert eval(answer.split("result:\n", 1)[1]) == EXPECTED


def test_openai_chat_completions_loop(agent: Session) -> None:
    tools = agent.tools(format="openai")
    assert [t["function"]["name"] for t in tools] == list(NAMES)
    messages = agent.handle_tool_calls(_chat(("call_1", *MULTI), ("call_x", "get_weather", {"city": "Lyon"})))
    assert [m["tool_call_id"] for m in messages] == ["call_1"]  # a tool of the caller's own is left to it
    assert messages[0]["role"] == "tool"
    rid = _offload_id(messages[0]["content"])

    messages = agent.handle_tool_calls(_chat(
        ("call_2", "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": CELL.format(rid=rid)}),
        ("call_3", "WORKBENCH_REMOTE_BASH_TOOL", {"command": f"wc -c < .responses/{rid}.json; echo oops >&2; exit 3"}),
    ))
    assert [m["tool_call_id"] for m in messages] == ["call_2", "call_3"]
    _cell_answer(messages[0]["content"])
    bash = messages[1]["content"]
    assert bash.startswith("exit code: 3\nstdout:\n") and bash.endswith("stderr:\noops")
    assert int(bash.split("stdout:\n")[1].split()[0]) > 100_000


def test_anthropic_messages_loop(agent: Session) -> None:
    tools = agent.tools(format="anthropic")
    assert {t["name"] for t in tools} == set(NAMES)
    assert all(t["input_schema"]["type"] == "object" for t in tools)
    [message] = agent.handle_tool_calls(_claude(("toolu_1", *MULTI)))
    assert message["role"] == "user"
    [block] = message["content"]
    assert block["type"] == "tool_result" and block["tool_use_id"] == "toolu_1" and "is_error" not in block
    rid = _offload_id(block["content"])

    [message] = agent.handle_tool_calls(_claude(
        ("toolu_2", "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": CELL.format(rid=rid)}),
        ("toolu_3", "WORKBENCH_REMOTE_BASH_TOOL", {"command": "id -u; pwd"}),
        ("toolu_4", "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "1 / 0"}),
    ))
    cell, bash, error = message["content"]
    _cell_answer(cell["content"])
    assert bash["tool_use_id"] == "toolu_3" and bash["content"].endswith("/workspace") and "is_error" not in bash
    assert error["is_error"] is True and "ZeroDivisionError" in error["content"]
    assert agent.handle_tool_calls(_claude()) == []  # a message without tool calls needs no answer


def test_openai_responses_api(agent: Session) -> None:
    tools = agent.tools(format="openai_responses")
    assert tools[0]["type"] == "function" and tools[0]["name"] == "WORKBENCH_SEARCH_TOOLS"
    items = agent.handle_tool_calls(_responses(
        ("c1", "WORKBENCH_SEARCH_TOOLS", {"queries": [{"use_case": "send an email", "known_fields": "to: a@b.c"}]}),
        ("c2", "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "21 * 2"}),
    ))
    assert [(i["type"], i["call_id"]) for i in items] == [("function_call_output", "c1"), ("function_call_output", "c2")]
    found = json.loads(items[0]["output"])["results"][0]["tools"]
    assert found[0]["tool_slug"] == "agt.mail.send"
    assert found[0]["input_schema"]["required"] == ["to", "subject"]
    assert items[1]["output"] == "result:\n42"


def test_dicts_of_the_same_shape_are_accepted(agent: Session) -> None:
    messages = agent.handle_tool_calls(_chat(("a", "WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "2"})).model_dump())
    assert messages == [{"role": "tool", "tool_call_id": "a", "content": "result:\n2"}]


def test_mcp_and_langchain_formats(agent: Session) -> None:
    mcp = agent.tools(format="mcp")
    assert [t["name"] for t in mcp] == list(NAMES) and all("inputSchema" in t for t in mcp)
    assert all("$defs" not in json.dumps(t["inputSchema"]) for t in mcp)  # refs inlined for every client
    tools = agent.tools(format="langchain")
    assert all(isinstance(t, StructuredTool) for t in tools)
    by_name = {t.name: t for t in tools}
    assert by_name["WORKBENCH_REMOTE_WORKBENCH"].invoke({"code_to_execute": "6 * 7"}) == "result:\n42"
    found = by_name["WORKBENCH_SEARCH_TOOLS"].invoke({"queries": [{"use_case": "contacts of the crm"}]})
    assert json.loads(found)["results"][0]["tools"][0]["tool_slug"].startswith("AGT_CRM_")
    answer = by_name["WORKBENCH_GET_TOOL_SCHEMAS"].invoke({"tool_slugs": ["AGT_CRM_GET_CONTACT", "NOPE"]})
    schemas = json.loads(answer)
    assert schemas["schemas"]["AGT_CRM_GET_CONTACT"]["input_schema"]["properties"] == {"contact_id": {"type": "integer"}}
    assert schemas["schemas"]["AGT_CRM_GET_CONTACT"]["output_schema"] == {"additionalProperties": True,
                                                                           "type": "object"}
    assert schemas["not_found"] == ["NOPE"]
    with pytest.raises(Exception, match="unknown tool format"):
        agent.tools(format="gemini")  # type: ignore[arg-type]


def test_include_tools_offers_the_sessions_tools_directly(agent: Session) -> None:
    tools = agent.tools(format="openai", include_tools=True)
    names = [t["function"]["name"] for t in tools]
    assert names[:5] == list(NAMES)
    assert set(names[5:]) == {"AGT_CRM_LIST_CONTACTS", "AGT_CRM_GET_CONTACT", "agt_mail_send", "AGT_FAILS"}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names)
    sent = json.loads(agent.handle_tool_call("agt_mail_send", {"to": "a@b.c", "subject": "hi"}))
    assert sent == {"sent": True, "to": "a@b.c", "correlation": "corr-42"}  # the session's metadata reached it
    listed = json.loads(agent.handle_tool_call("AGT_CRM_LIST_CONTACTS", "{}"))
    assert listed["offload"]["records"] == CONTACTS  # too large to read here: offloaded, not cut
    assert agent.handle_tool_call("AGT_FAILS").startswith("[error: tool_error] RuntimeError")


@pytest.mark.parametrize(("name", "arguments", "expected"), [
    ("NOPE", {}, "[error: not_found] no tool 'NOPE'"),
    (None, {}, "[error: not_found] no tool 'NoneType'"),
    ("X" * 100_000, {}, "[error: not_found] no tool 'XXXX"),
    ("WORKBENCH_REMOTE_WORKBENCH", "{not json", "[error: invalid_arguments] the arguments are not valid JSON"),
    ("WORKBENCH_REMOTE_WORKBENCH", "[1, 2]", "[error: invalid_arguments] the arguments must be a JSON object"),
    ("WORKBENCH_REMOTE_WORKBENCH", "[" * 100_000 + "]" * 100_000, "[error: invalid_arguments]"),
    ("WORKBENCH_REMOTE_WORKBENCH", {}, "[error: invalid_arguments] WORKBENCH_REMOTE_WORKBENCH: code_to_execute: Field"),
    ("WORKBENCH_REMOTE_WORKBENCH", {"code": "1"}, "[error: invalid_arguments]"),
    ("WORKBENCH_REMOTE_BASH_TOOL", {"command": "true", "timeout": -1}, "[error: invalid_arguments]"),
    ("WORKBENCH_MULTI_EXECUTE_TOOL", {"tools": [{"tool_slug": "X"}] * 51}, "[error: invalid_arguments]"),
    ("WORKBENCH_SEARCH_TOOLS", {"queries": "contacts"}, "[error: invalid_arguments]"),
    ("AGT_CRM_GET_CONTACT", {"contact_id": "seven"}, "[error: invalid_arguments]"),
])
def test_bad_calls_are_answered_not_raised(agent: Session, name: Any, arguments: Any, expected: str) -> None:
    answer = agent.handle_tool_call(name, arguments)
    assert answer.startswith(expected)
    assert len(answer) <= LIMIT


def test_answers_are_bounded_and_kept_whole_in_the_workspace(wb: Workbench, agent: Session) -> None:
    big = agent.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "print('ab' * 50_000)"})
    assert len(big) <= LIMIT
    path = re.search(r"all of it is in /workspace/(\S+) \.\.\.", big)
    assert path is not None
    whole = agent.files.read(path.group(1)).decode()
    assert whole == "stdout:\n" + "ab" * 50_000
    assert big.startswith(whole[:3000]) and big.endswith(whole[-1000:])

    with Workbench(home=wb.home, pool_size=0, idle_timeout=None, answer_limit=500, execute_timeout=3) as small:
        for tool in wb.tools.allowed(["agt_crm", "agt_mail"], []):  # a process registers its own tools
            small.tools.register(tool.fn, slug=tool.slug, toolkit=tool.toolkit, description=tool.description)
        same = small.use(agent.session_id)
        for name, arguments in [
            ("WORKBENCH_SEARCH_TOOLS", {"queries": [{"use_case": "crm contacts"}] * 10}),
            ("WORKBENCH_GET_TOOL_SCHEMAS", {"tool_slugs": ["AGT_CRM_LIST_CONTACTS", "AGT_CRM_GET_CONTACT"] * 5}),
            MULTI,
            ("WORKBENCH_REMOTE_BASH_TOOL", {"command": "seq 1 100000"}),
            ("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "list(range(10_000))"}),
            ("AGT_CRM_GET_CONTACT", {"contact_id": 10 ** 3000}),
            ("WORKBENCH_SEARCH_TOOLS", {("k" * 80 + str(i)): 1 for i in range(6)}),  # a long error, bounded too
            ("X" * 5_000, {}),
        ]:
            answer = same.handle_tool_call(name, arguments)
            assert len(answer) <= 500, name

        # a model's timeout is never past the host's execute_timeout (3 s here), whatever it asks
        started = time.monotonic()
        slept = same.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "import time\n"
                                      "time.sleep(60)", "timeout": 86_400})
        assert "timed out after 3" in slept
        killed = same.handle_tool_call("WORKBENCH_REMOTE_BASH_TOOL", {"command": "sleep 60", "timeout": 86_400})
        assert killed.startswith("timed out after 3") and time.monotonic() - started < 30
        multi = same.handle_tool_call(*MULTI)  # each response shares the smaller answer: offloaded, not cut
        assert multi.startswith('{"results":[{"tool_slug":"AGT_CRM_LIST_CONTACTS","ok":true,"offload"')
    with pytest.raises(Exception, match="answer_limit"):
        Workbench(home=wb.home, pool_size=0, idle_timeout=None, answer_limit=10)


def _made_up(fields: list[str]) -> Any:
    def fn(**arguments: str) -> None:
        return None

    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str) for name in fields])
    fn.__annotations__ = {name: str for name in fields}
    return fn


def _registry_of_200() -> tuple[ToolRegistry, dict[str, str]]:
    """200 made-up tools: 10 services, 4 kinds of thing each, 5 verbs; and queries with the tool each means."""
    services = {
        "github": ["issue", "pull request", "repository", "branch"],
        "slack": ["message", "channel", "reminder", "user group"],
        "gmail": ["email", "draft", "label", "attachment"],
        "jira": ["ticket", "sprint", "epic", "board"],
        "notion": ["page", "database", "block", "comment"],
        "salesforce": ["lead", "opportunity", "account", "campaign"],
        "stripe": ["invoice", "customer", "subscription", "refund"],
        "shopify": ["product", "order", "inventory item", "discount"],
        "zendesk": ["support request", "macro", "agent", "satisfaction rating"],
        "calendar": ["event", "calendar", "attendee", "availability"],
    }
    verbs = {"list": "List the {o}s of {s}", "get": "Get one {o} of {s} by its id", "create": "Create a new {o} in {s}",
             "update": "Update an existing {o} in {s}", "delete": "Delete a {o} from {s}"}
    registry = ToolRegistry()
    for service, objects in services.items():
        for obj in objects:
            for verb, text in verbs.items():
                slug = f"{service}_{verb}_{obj.replace(' ', '_')}".upper()
                fields = {"github": ["owner", "repo"], "slack": ["channel_id"], "stripe": ["customer_id"]}.get(service,
                                                                                                          ["id"])
                registry.register(_made_up(fields), slug=slug, toolkit=service,
                                  description=text.format(o=obj, s=service.title()))
    queries = {
        "open a new issue on github": "GITHUB_CREATE_ISSUE",
        "list all pull requests of a repo": "GITHUB_LIST_PULL_REQUEST",
        "post a message in a slack channel": "SLACK_CREATE_MESSAGE",
        "remove a jira ticket": "JIRA_DELETE_TICKET",
        "add a new discount code in shopify": "SHOPIFY_CREATE_DISCOUNT",
        "show me the orders in my shopify store": "SHOPIFY_LIST_ORDER",
        "update a salesforce opportunity": "SALESFORCE_UPDATE_OPPORTUNITY",
        "fetch a notion page by id": "NOTION_GET_PAGE",
        "discard an unsent draft in gmail": "GMAIL_DELETE_DRAFT",
        "cancel a subscription of a customer": "STRIPE_DELETE_SUBSCRIPTION",
        "schedule a calendar event": "CALENDAR_CREATE_EVENT",
        "which zendesk agents are there": "ZENDESK_LIST_AGENT",
    }
    return registry, queries


def test_search_ranks_the_right_tool_first_among_200() -> None:
    registry, queries = _registry_of_200()
    tools = tuple(t for t in registry.allowed(
        ["github", "slack", "gmail", "jira", "notion", "salesforce", "stripe", "shopify", "zendesk", "calendar"], []))
    assert len(tools) == 200
    index = ToolIndex(tools)
    misses = {q: [t.slug for t, _ in index.search(q, 3)] for q, slug in queries.items()
              if index.search(q, 1)[0][0].slug != slug}
    assert not misses
    assert index.search("quantum entanglement", 5) == []  # nothing in common: nothing, not noise


def test_search_through_the_session_sees_only_allowed_tools(wb: Workbench, agent: Session) -> None:
    registry, _ = _registry_of_200()
    for tool in registry.allowed(["github", "slack"], []):
        if tool.slug not in wb.tools:
            wb.tools.register(tool.fn, slug=tool.slug, toolkit=f"agt_{tool.toolkit}", description=tool.description)
    answer = json.loads(agent.handle_tool_call("WORKBENCH_SEARCH_TOOLS", {"queries": [
        {"use_case": "open a new issue on github"}, {"use_case": "list the contacts"}]}))
    assert answer["results"][0]["tools"] == []  # github tools exist, but not for this session
    assert answer["results"][1]["tools"][0]["tool_slug"] == "AGT_CRM_LIST_CONTACTS"
    agent.update(toolkits=["agt_crm", "agt_mail", "agt_github"])
    try:
        answer = json.loads(agent.handle_tool_call("WORKBENCH_SEARCH_TOOLS", {"queries": [
            {"use_case": "open a new issue on github"}]}))
        assert answer["results"][0]["tools"][0]["tool_slug"] == "GITHUB_CREATE_ISSUE"
        assert len(answer["results"][0]["tools"]) <= 5
    finally:
        agent.update(toolkits=["agt_crm", "agt_mail"])


def test_async_twins(wb: Workbench, agent: Session) -> None:
    async def main() -> tuple[list[Any], str, list[dict[str, Any]]]:
        async with AsyncWorkbench(home=wb.home, pool_size=0, idle_timeout=None) as awb:
            session = await awb.use(agent.session_id)
            return (session.tools("mcp"),
                    await session.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", '{"code_to_execute": "3 * 3"}'),
                    await session.handle_tool_calls(_claude(("t", "WORKBENCH_REMOTE_WORKBENCH",
                                                             {"code_to_execute": "4"}))))

    tools, answer, messages = asyncio.run(main())
    assert [t["name"] for t in tools] == list(NAMES)
    assert answer == "result:\n9"
    assert messages[0]["content"][0]["content"] == "result:\n4"


def test_odd_responses_and_a_closed_session_never_raise(wb: Workbench) -> None:
    s = wb.create("agent-user", toolkits=["agt_crm"])
    call = {"id": "c1", "type": "function", "function": {"name": "WORKBENCH_REMOTE_WORKBENCH",
                                                          "arguments": '{"code_to_execute": "5"}'}}
    for odd in [{"choices": []}, {"choices": ["x"]}, {"choices": [{"message": "hi"}]},
                {"choices": [{"message": {"tool_calls": 5}}]}, {"choices": [{"message": {"tool_calls": [None, 3]}}]},
                {"choices": [{"message": {"tool_calls": [{**call, "id": None}, {**call, "function": None}]}}]},
                {"choices": [{"message": {"tool_calls": [{**call, "function": {"name": 7, "arguments": "{}"}}]}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "name": "WORKBENCH_SEARCH_TOOLS"}, "x"]},
                {"object": "response", "output": [{"type": "function_call", "name": "X"}, None]}]:
        assert s.handle_tool_calls(odd) == [], odd  # nothing that can be answered: no message, no exception
    assert s.handle_tool_calls({"choices": [{"message": {"tool_calls": [call]}}]})[0]["content"] == "result:\n5"
    with pytest.raises(WorkbenchError, match="not a model response"):
        s.handle_tool_calls(42)  # the caller's mistake, not the model's: said at once

    own = {"id": "c2", "type": "function", "function": {"name": "AGT_CRM_GET_CONTACT", "arguments": '{"contact_id": 1}'}}
    chat = {"choices": [{"message": {"role": "assistant", "tool_calls": [call, own]}}]}
    assert [m["tool_call_id"] for m in s.handle_tool_calls(chat)] == ["c1"]  # its tools were not offered directly
    assert [m["tool_call_id"] for m in s.handle_tool_calls(chat, include_tools=True)] == ["c1", "c2"]
    s.close()
    closed = s.handle_tool_calls(chat, include_tools=True)
    assert [m["tool_call_id"] for m in closed] == ["c1"]
    assert closed[0]["content"].startswith("[error: session_closed]")
    assert s.handle_tool_call("AGT_CRM_GET_CONTACT", {"contact_id": 1}).startswith("[error: session_closed]")


def test_search_of_stop_words_finds_nothing_and_fails_nothing(agent: Session) -> None:
    answer = json.loads(agent.handle_tool_call("WORKBENCH_SEARCH_TOOLS", {"queries": [
        {"use_case": "the a of"}, {"use_case": "!!!"}, {"use_case": "list the contacts"}]}))
    assert [len(r["tools"]) > 0 for r in answer["results"]] == [False, False, True]


def test_langchain_errors_are_tool_messages_with_error_status(agent: Session) -> None:
    tool = {t.name: t for t in agent.tools("langchain")}["WORKBENCH_REMOTE_WORKBENCH"]
    message = tool.invoke({"type": "tool_call", "id": "lc1", "name": tool.name, "args": {"code_to_execute": "1 / 0"}})
    assert message.status == "error" and "ZeroDivisionError" in message.content and message.tool_call_id == "lc1"
    message = tool.invoke({"type": "tool_call", "id": "lc2", "name": tool.name, "args": {"code_to_execute": "7"}})
    assert message.status == "success" and message.content == "result:\n7"


def test_schemas_lose_generated_titles_but_keep_their_data() -> None:
    from pydantic import BaseModel, Field

    class Report(BaseModel):
        title: str = Field(description="a parameter named title stays")
        layout: dict = Field(default={"title": "Report", "n": 1})
        kind: str = Field(default="pdf", examples=[{"title": "x"}])

    schema = clean_schema(Report.model_json_schema())
    assert "title" not in schema and "title" in schema["properties"]
    assert "title" not in schema["properties"]["layout"]
    assert schema["properties"]["layout"]["default"] == {"title": "Report", "n": 1}
    assert schema["properties"]["kind"]["examples"] == [{"title": "x"}]
