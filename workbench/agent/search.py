"""Ranking a session's tools by how well they fit a use case: BM25 over slug, toolkit, description and
parameter names (bm25s, with an English stemmer)."""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from ..tools import Tool

if TYPE_CHECKING:
    import bm25s

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_.\-/]+")


# What agents ask for in other words than tools are named by: a query word adds the verbs it means. (BM25 alone
# knows no synonyms: "remove a ticket" would rank JIRA_LIST_TICKET as high as JIRA_DELETE_TICKET.)
_MEANS = {
    "create": "add new make post open file schedule compose insert start submit register book",
    "delete": "remove cancel drop erase destroy trash discard unsubscribe",
    "get": "fetch retrieve read lookup detail details single specific one",
    "list": "all show enumerate browse which every many",
    "update": "edit modify change patch rename alter set",
    "send": "post notify deliver dispatch reply forward",
    "search": "find query look lookup",
}


@functools.cache
def _stemmer() -> Any:
    import Stemmer  # imported on first search: numpy and bm25s are not needed before

    return Stemmer.Stemmer("english")


@functools.cache
def _synonyms() -> dict[str, list[str]]:
    stem = _stemmer().stemWord
    synonyms: dict[str, list[str]] = {}
    for verb, words in _MEANS.items():
        for word in words.split():
            synonyms.setdefault(stem(word), []).append(stem(verb))
    return synonyms


def _words(text: str) -> str:
    """Identifiers split into words: GITHUB_LIST_ISSUES, listIssues and list-issues all become 'list issues'."""
    return _SEPARATORS.sub(" ", _CAMEL.sub(" ", text))


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    tokens: list[list[str]] = bm25s.tokenize([_words(t) for t in texts], stopwords="en",
                                             stemmer=_stemmer().stemWords, return_ids=False, show_progress=False)
    return tokens


def _document(tool: Tool) -> str:
    params = " ".join(_parameter_names(tool.schema))
    # the slug counts twice: it names what the tool does more reliably than a long description
    return f"{tool.slug} {tool.slug} {tool.toolkit} {tool.description} {params}"


def _parameter_names(schema: dict[str, Any]) -> list[str]:
    return [name for name in schema.get("properties", {}) if isinstance(name, str)]


class ToolIndex:
    """A BM25 index over a fixed list of tools."""

    def __init__(self, tools: tuple[Tool, ...]) -> None:
        self.tools = tools
        self._retriever: bm25s.BM25 | None = None
        if tools:
            import bm25s

            self._retriever = bm25s.BM25()
            self._retriever.index(_tokens([_document(t) for t in tools]), show_progress=False)

    def search(self, query: str, limit: int = 5) -> list[tuple[Tool, float]]:
        """The tools that match the query, best first, at most `limit`; tools that share no word with it are left
        out."""
        if self._retriever is None or not query.strip():
            return []
        words = _tokens([query])[0]
        if not words:  # only stop words or punctuation
            return []
        scores = self._retriever.get_scores(words + [verb for word in words for verb in _synonyms().get(word, ())])
        ranked = sorted(range(len(self.tools)), key=lambda i: (-scores[i], i))
        return [(self.tools[i], float(scores[i])) for i in ranked[:limit] if scores[i] > 0]


@functools.lru_cache(maxsize=128)
def index_of(tools: tuple[Tool, ...]) -> ToolIndex:
    """The index of these tools, built once for each set a session is allowed (tools never change once
    registered)."""
    return ToolIndex(tools)
