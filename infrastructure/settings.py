import os
from dataclasses import dataclass
from pathlib import Path

from infrastructure.auth import TokenSettings


@dataclass(frozen=True)
class Settings:
    """Where the data lives and how to reach it; read once, at start-up."""

    data_dir: Path
    event_store_url: str
    read_store_url: str
    tokens: TokenSettings = TokenSettings()
    # How long a query with consistentWith waits for the projections, in seconds.
    consistency_timeout: float = 5.0

    @classmethod
    def load(cls, data_dir: str | None = None, environ=os.environ) -> "Settings":
        """Command-line values win over the environment, which wins over defaults."""
        folder = Path(data_dir or environ.get("ORDERSTREAM_DATA_DIR") or "./var").resolve()
        timeout = environ.get("ORDERSTREAM_CONSISTENCY_TIMEOUT") or "5"
        try:
            consistency_timeout = float(timeout)
        except ValueError:
            raise ValueError(f"ORDERSTREAM_CONSISTENCY_TIMEOUT must be seconds, e.g. 5; got {timeout!r}") from None
        return cls(
            data_dir=folder,
            event_store_url=environ.get("ORDERSTREAM_EVENT_STORE_URL")
            or f"sqlite+aiosqlite:///{folder / 'events.db'}",
            read_store_url=environ.get("ORDERSTREAM_READ_STORE_URL")
            or f"sqlite+aiosqlite:///{folder / 'read.db'}",
            tokens=TokenSettings.from_environ(environ),
            consistency_timeout=consistency_timeout,
        )
