"""Traffic logging: one record per served row, handed to ``settings.on_request``.

The hook is usually an ``adapters.monitoring.traffic_log.TrafficLogger``, which samples the records
into a JSONL or SQLite file for drift monitoring (``adapters.monitoring``).
"""

from __future__ import annotations

import logging
import time

from adapters.serving.engine import InferenceEngine
from adapters.serving.http.settings import ServerSettings

log = logging.getLogger(__name__)


def _at(values: list | None, i: int):
    return values[i] if values is not None and i < len(values) else None


def log_traffic(
    settings: ServerSettings,
    engine: InferenceEngine,
    endpoint: str,
    ref: str,
    started: float,
    status: int,
    fields: dict,
) -> None:
    """Call ``settings.on_request`` once per row of a request (once for a failed request); no hook, no-op.

    Args:
        endpoint: the route's metrics name ("completions", "chat_completions", "classify").
        ref: the adapter reference the client asked for.
        started: when the request began, from time.perf_counter(); ``latency_s`` is measured from it.
        status: the HTTP status answered.
        fields: what the route gathered, per row where a list: "texts", "row_input_tokens",
            "row_output_tokens", "labels", "confidences", "finish_reasons", and with
            ``settings.traffic_include_text`` also "input_ids" and "outputs"; "rows" and "request_id".

    A failing hook is logged and ignored: logging must not fail the request.
    """
    hook = settings.on_request
    if hook is None:
        return
    n = max(1, fields.get("rows", 1) if status < 400 else 1)
    for i in range(n):
        row = {
            "request_id": fields.get("request_id"),
            "timestamp": time.time(),
            "endpoint": endpoint,
            "adapter": ref,
            "base_model": engine.base_name,
            "task": engine.task,
            "status": status,
            "latency_s": time.perf_counter() - started,
            "input_chars": len(t) if (t := _at(fields.get("texts"), i)) is not None else None,
            "input_tokens": _at(fields.get("row_input_tokens"), i),
            "output_tokens": _at(fields.get("row_output_tokens"), i),
            "label": _at(fields.get("labels"), i),
            "confidence": _at(fields.get("confidences"), i),
            "finish_reason": _at(fields.get("finish_reasons"), i),
        }
        if settings.traffic_include_text:
            row["text"] = _at(fields.get("texts"), i)
            row["input_ids"] = _at(fields.get("input_ids"), i)
            row["output_text"] = _at(fields.get("outputs"), i)
        try:
            hook(row)
        except Exception:  # noqa: BLE001 - a logging failure must not fail the request
            log.exception("traffic hook on_request failed")
