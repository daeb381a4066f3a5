"""The HTTP server's settings: limits, batching, auth and the traffic hook."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TOKEN_ENV = "ADAPTERKIT_API_TOKEN"


class ServerSettings(BaseModel):
    """Limits, batching and auth of the HTTP server.

    ``on_request`` is the traffic hook: called with one record (a dict) per request row, typically an
    ``adapters.monitoring.traffic_log.TrafficLogger``; see ``adapters.serving.http.traffic``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    api_token: str | None = Field(
        None, description=f"Bearer token required on /v1/* and /metrics (default: env {TOKEN_ENV})."
    )
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted (413 above).")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt / input in tokens (400 above).")
    max_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    max_inputs: int = Field(32, ge=1, description="Most prompts / texts in one request.")
    max_batch_size: int = Field(
        16, ge=1, description="Most rows decoding at once (continuous) or in one engine call (window)."
    )
    batching: Literal["continuous", "window"] = Field(
        "continuous",
        description="continuous: requests join and leave the running decode batch between steps; "
        "window: requests gathered for batch_window_ms run as one batch to its end (adapters.serving.http.batcher).",
    )
    join_every_steps: int = Field(
        4,
        ge=1,
        description="continuous: waiting requests join the running batch together at most every this many "
        "decode steps (at once when nothing runs), sharing one prefill pass (1: at every step).",
    )
    batch_window_ms: float = Field(
        5.0, ge=0, description="How long the window batcher waits for more requests after the first."
    )
    mix_adapters: bool = Field(
        True, description="Let one engine batch hold requests for different adapters (off: one batch per adapter)."
    )
    allow_path_refs: bool = Field(
        False,
        description="Accept adapter folder paths from clients (off: only store references, "
        "so clients cannot probe the server's files).",
    )
    on_request: Callable[[dict], Any] | None = Field(
        None, exclude=True, description="Traffic hook, called with one record per request."
    )
    traffic_include_text: bool = Field(False, description="Pass raw input/output text and token ids to on_request.")

    def token(self) -> str | None:
        """The bearer token clients must send: ``api_token``, else ``$ADAPTERKIT_API_TOKEN``; None means no auth."""
        return self.api_token if self.api_token is not None else (os.environ.get(TOKEN_ENV) or None)
