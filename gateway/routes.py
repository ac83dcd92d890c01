"""Every route handler of the gateway, in the order the app registers them (the OpenAPI document's
order too: ``gateway.openapi`` walks these handlers)."""

from __future__ import annotations

from typing import Any

from gateway.admin.serving import ADMIN_ROUTES
from gateway.chat.serving import chat_completions
from gateway.completions.serving import completions
from gateway.images.serving import image_edits, image_file, image_generations, image_variations
from gateway.models.serving import get_model, list_models
from gateway.operations.serving import health, metrics, openapi_document, ready
from gateway.responses.retrieval import cancel_response, delete_response, list_input_items, retrieve_response
from gateway.embeddings.serving import create_embedding
from gateway.responses.serving import count_input_tokens, create_response

#: The routes every gateway serves.
ROUTES = (chat_completions, completions, create_response, count_input_tokens, retrieve_response, delete_response,
          list_input_items, cancel_response, create_embedding, image_generations, image_edits, image_variations,
          image_file, list_models, get_model, health, ready, metrics, openapi_document)


def route_handlers(*, admin: bool) -> list[Any]:
    """The handlers an app registers: the admin routes only with ``admin`` (an admin credential is
    set: admin routes do not exist without one to guard them)."""
    return [*ROUTES, *(ADMIN_ROUTES if admin else ())]
