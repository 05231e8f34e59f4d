"""Ranking a session's tools by how well they fit a use case: BM25 over slug, toolkit, description and
parameter names (bm25s, with an English stemmer)."""
from __future__ import annotations

import functools
import re
from typing import Any

import bm25s
import Stemmer

from ..tools import Tool

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_.\-/]+")
_STEMMER = Stemmer.Stemmer("english")


def _words(text: str) -> str:
    """Identifiers split into words: GITHUB_LIST_ISSUES, listIssues and list-issues all become 'list issues'."""
    return _SEPARATORS.sub(" ", _CAMEL.sub(" ", text))


def _tokens(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize([_words(t) for t in texts], stopwords="en", stemmer=_STEMMER.stemWords,
                          return_ids=False, show_progress=False)


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
            self._retriever = bm25s.BM25()
            self._retriever.index(_tokens([_document(t) for t in tools]), show_progress=False)

    def search(self, query: str, limit: int = 5) -> list[tuple[Tool, float]]:
        """The tools that match the query, best first, at most `limit`; tools that share no word with it are left
        out."""
        if self._retriever is None or not query.strip():
            return []
        scores = self._retriever.get_scores(_tokens([query])[0])
        ranked = sorted(range(len(self.tools)), key=lambda i: (-scores[i], i))
        return [(self.tools[i], float(scores[i])) for i in ranked[:limit] if scores[i] > 0]


@functools.lru_cache(maxsize=128)
def index_of(tools: tuple[Tool, ...]) -> ToolIndex:
    """The index of these tools, built once for each set a session is allowed (tools never change once
    registered)."""
    return ToolIndex(tools)
