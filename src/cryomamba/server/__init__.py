"""The CryoMamba server: Starlette app, uploads, job queue, WebSockets, auth, storage.

Needs the `server` extra (`pip install cryomamba[server]`). Start it with
`python -m cryomamba.serve --data-dir DIR` (see docs/server.md).
"""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
