"""What a user waits for: a cell's round trip in a real IPython kernel over the Jupyter protocol
(execute_request to execute_reply), a %%celery_docker cell against a cell that calls a raw
Celery task on the same Redis."""
from __future__ import annotations

import queue
from typing import Any

from jupyter_client import KernelManager


class BenchKernel:
    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env, cwd=cwd)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str) -> None:
        """Execute ``code`` and wait for its reply; fail loudly on an error."""
        msg_id = self.client.execute(code)
        while True:
            reply: dict[str, Any] = self.client.get_shell_msg(timeout=120)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        self._drain_iopub()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the benchmark cell failed in the kernel: {reply['content']}\n{code}")

    def _drain_iopub(self) -> None:
        while True:
            try:
                self.client.get_iopub_msg(timeout=0)
            except queue.Empty:
                return

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
