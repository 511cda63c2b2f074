"""Where a job's events (progress, displays) go: the runner connects ``sink`` to the job's
frame channel inside a container; elsewhere it stays None and nothing is sent."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

sink: Optional[Callable[[Dict[str, Any]], None]] = None
