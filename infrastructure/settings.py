import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Where the data lives and how to reach it; read once, at start-up."""

    data_dir: Path
    event_store_url: str
    jwt_secret: str | None = None

    @classmethod
    def load(cls, data_dir: str | None = None, environ=os.environ) -> "Settings":
        """Command-line values win over the environment, which wins over defaults."""
        folder = Path(data_dir or environ.get("ORDERSTREAM_DATA_DIR") or "./var").resolve()
        url = environ.get("ORDERSTREAM_EVENT_STORE_URL") or f"sqlite+aiosqlite:///{folder / 'events.db'}"
        return cls(data_dir=folder, event_store_url=url,
                   jwt_secret=environ.get("ORDERSTREAM_JWT_SECRET") or None)
