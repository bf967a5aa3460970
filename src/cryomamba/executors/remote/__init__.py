"""The `remote` executor: the client of `cryomamba serve`, behaving exactly like `local`.

`executor.py` holds the executor; `_upload.py` the chunked, resumable upload; `_follow.py`
the job's WebSocket; `_download.py` the checked download of the results; `_http.py` requests
with retries and errors.
"""

from ._http import RemoteError
from .executor import RemoteExecutor, ServerPath, UploadedFile, cryomamba_register_executors

__all__ = [
    "RemoteError",
    "RemoteExecutor",
    "ServerPath",
    "UploadedFile",
    "cryomamba_register_executors",
]
