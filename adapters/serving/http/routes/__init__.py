"""The HTTP routes, one module per area; each defines ``router`` at module level.

generation (/v1/completions, /v1/chat/completions), classification (/v1/classify), models (/v1/models,
/v1/adapters/load, /v1/adapters/unload), operations (/health, /metrics). ``context`` holds what they share.
"""

from __future__ import annotations

from adapters.serving.http.routes import classification, generation, models, operations

ROUTERS = (generation.router, classification.router, models.router, operations.router)
