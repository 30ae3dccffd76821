"""What the chat demo's end-to-end tests read back from the services: the alias history and feedback items."""

from __future__ import annotations

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.client import Gristmill


def alias_history(gm: Gristmill, model: str) -> list[rg.AliasChange]:
    """Every alias change of ``model``, oldest first."""
    changes = gm.registry.GetAliasHistory(rg.GetAliasHistoryRequest(registered_model_name=model)).changes
    return sorted(changes, key=lambda c: c.sequence)


def feedback_items(gm: Gristmill, project_id: str) -> list[lb.Item]:
    """Every item of ``project_id`` that came from feedback, all pages."""
    items: list[lb.Item] = []
    token = ""
    while True:
        page = gm.labeling.ListItems(
            lb.ListItemsRequest(
                project_id=project_id,
                source=lb.ITEM_SOURCE_FEEDBACK,
                page=common_pb2.PageRequest(page_size=500, page_token=token),
            )
        )
        items.extend(page.items)
        token = page.next_page_token
        if not token:
            return items
