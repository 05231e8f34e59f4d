"""An app module for `workbench mcp --app mcp_app:wb` in the MCP tests: a Workbench (home from WORKBENCH_HOME) with
the tools the tests call registered on it."""
from __future__ import annotations

from workbench import Workbench

ROWS = 4_000


def register(wb: Workbench) -> None:
    """The test tools: MCP_LIST_ORDERS returns ROWS records, enough to be offloaded."""

    @wb.tool(slug="MCP_LIST_ORDERS", toolkit="mcp_shop")
    def list_orders(status: str = "open") -> list[dict]:
        """List the shop's orders of one status, with their city and amount."""
        return [{"id": i, "status": status, "city": ["Lyon", "Paris"][i % 2], "amount": i} for i in range(ROWS)]


wb = Workbench(pool_size=0)
register(wb)
