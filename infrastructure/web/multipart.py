"""Apollo's multipart subscriptions (`Accept: multipart/mixed;subscriptionSpec="1.0"`).

The response is `multipart/mixed; boundary="graphql"`: each part is JSON,
`{"payload": <execution result>}`, a heartbeat `{}` comes every 5 seconds, and the closing
boundary ends the operation. Every part is followed by the next boundary at once, so that a
client sees a part complete as soon as it arrives. Errors that end the stream without a
result are a part `{"payload": null, "errors": [...]}`, as the protocol has it.
"""

import json
from typing import Any

BOUNDARY = b"graphql"
PART = b"\r\nContent-Type: application/json; charset=utf-8\r\n\r\n"
DELIMITER = b"\r\n--" + BOUNDARY


class MultipartSubscription:
    """web.streams.Framing for multipart subscriptions."""

    transport = "multipart"
    media_type = 'multipart/mixed; boundary="graphql"; subscriptionSpec="1.0"'
    opening = DELIMITER
    keep_alive = PART + b"{}" + DELIMITER
    keep_alive_interval = 5.0

    def next(self, payload: str, position: int | None) -> bytes:
        return PART + b'{"payload":' + payload.encode() + b"}" + DELIMITER

    def error(self, errors: list[dict[str, Any]]) -> bytes:
        return PART + json.dumps({"payload": None, "errors": errors}).encode() + DELIMITER

    def end(self) -> bytes:
        return b"--\r\n"


def is_multipart_subscription(media_type: str, parameters: dict[str, str]) -> bool:
    """An Accept media range that asks for multipart subscriptions."""
    return media_type == "multipart/mixed" and parameters.get("subscriptionspec", "").strip('"') == "1.0"
