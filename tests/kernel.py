"""A real IPython kernel driven over the Jupyter protocol, as a frontend would."""
from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from jupyter_client import KernelManager

JOB_HTML = 'class="celery-nb-job"'  # in the HTML of a job shown ended (widgets.finished_html)


@dataclass
class Execution:
    msg_id: str
    messages: list[dict] = field(default_factory=list)
    reply: dict | None = None

    def stream_text(self) -> str:
        return "".join(m["content"]["text"] for m in self.messages if m["msg_type"] == "stream")

    def error(self) -> dict | None:
        return next((m["content"] for m in self.messages if m["msg_type"] == "error"), None)

    def comm_opens(self, model_name: str) -> list[dict]:
        return [m["content"] for m in self.messages if m["msg_type"] == "comm_open"
                and m["content"]["data"]["state"].get("_model_name") == model_name]

    def comm_values(self, comm_id: str) -> list[Any]:
        """Successive 'value' states a widget model was given (open + updates)."""
        values = []
        for m in self.messages:
            content = m["content"]
            if m["msg_type"] in ("comm_open", "comm_msg") and content.get("comm_id") == comm_id:
                state = content["data"].get("state", {})
                if "value" in state:
                    values.append(state["value"])
        return values

    def job_id(self) -> str:
        """The id of the job whose widget this execution showed."""
        for value in self.html_values():
            if "<code title=" in value:
                return value.split('<code title="')[1].split('"')[0]
        raise AssertionError("no job id shown in the widget")

    def html_values(self) -> list[str]:
        """Every value any HTML widget was given, and the HTML of a job shown ended (without a
        widget: widgets.finished_html), in order."""
        ids = {c["comm_id"] for c in self.comm_opens("HTMLModel")}
        values = []
        for m in self.messages:
            content = m["content"]
            if m["msg_type"] in ("comm_open", "comm_msg") and content.get("comm_id") in ids:
                if "value" in content["data"].get("state", {}):
                    values.append(content["data"]["state"]["value"])
            elif m["msg_type"] == "display_data" and JOB_HTML in content["data"].get("text/html", ""):
                values.append(content["data"]["text/html"])
        return values


class Kernel:
    def __init__(self, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env={**os.environ, **env})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def start(self, code: str) -> Execution:
        return Execution(self.client.execute(code))

    def collect(self, execution: Execution, until: Callable[[dict], bool] | None = None,
                timeout: float = 120) -> Execution:
        """Read iopub until ``until(msg)`` holds, or until the execution is idle."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"kernel did not answer in {timeout} s; got {execution.messages[-5:]}")
            try:
                msg = self.client.get_iopub_msg(timeout=min(remaining, 1))
            except queue.Empty:
                continue
            # widget updates from the job's follower thread may carry no parent header
            if msg["parent_header"].get("msg_id") != execution.msg_id and not msg["msg_type"].startswith("comm_"):
                continue
            execution.messages.append(msg)
            if until is not None and until(msg):
                return execution
            if until is None and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                execution.reply = self._reply_to(execution.msg_id)
                return execution

    def _reply_to(self, msg_id: str) -> dict:
        """The shell reply to ``msg_id``; replies to others (e.g. a second kernel_info_request of
        wait_for_ready, on a slow start) are passed over."""
        while True:
            reply = self.client.get_shell_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def run(self, code: str, timeout: float = 120) -> Execution:
        return self.collect(self.start(code), timeout=timeout)

    def click(self, comm_id: str, subshell_id: str | None = None) -> None:
        """What a frontend sends when a person clicks an ipywidgets Button: to the main shell, or
        (as JupyterLab 4.4+ does) on the subshell ``subshell_id`` it opened for widgets."""
        msg = self.client.session.msg(
            "comm_msg", {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}})
        if subshell_id is not None:
            msg["header"]["subshell_id"] = subshell_id
        self.client.shell_channel.send(msg)

    def create_subshell(self) -> str:
        """Open a kernel subshell as a frontend does (a create_subshell_request on the control channel)."""
        msg = self.client.session.msg("create_subshell_request", {})
        self.client.control_channel.send(msg)
        while True:
            reply = self.client.control_channel.get_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["content"]["status"] == "ok", reply["content"]
                return reply["content"]["subshell_id"]

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
