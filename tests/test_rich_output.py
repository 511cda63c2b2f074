"""The runtime's display(): MIME bundles as Jupyter would build them, kept small enough to travel
in the event stream, and IPython's display() in an image that has IPython."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

from celery_nb_runtime import rich_output
from tests.conftest import ROOT


class Rich:
    def _repr_html_(self) -> str:
        return "<b>rich</b>"

    def _repr_png_(self) -> bytes:
        return b"\x89PNG fake"

    def _repr_markdown_(self) -> tuple[str, dict]:
        return "**rich**", {"note": 1}

    def _repr_latex_(self) -> str:
        raise RuntimeError("no latex today")

    def __repr__(self) -> str:
        return "Rich()"


def test_bundle_has_every_representation_plus_text(capsys) -> None:
    data, metadata = rich_output.mime_bundle(Rich())
    assert data == {"text/html": "<b>rich</b>", "image/png": base64.b64encode(b"\x89PNG fake").decode(),
                    "text/markdown": "**rich**", "text/plain": "Rich()"}
    assert metadata == {"text/markdown": {"note": 1}}
    assert "Rich._repr_latex_() failed" in capsys.readouterr().err  # reported, the rest still shown


def test_mimebundle_method_wins_and_classes_are_shown_as_text() -> None:
    class Bundled:
        def _repr_mimebundle_(self, include=None, exclude=None):
            return {"text/html": "<i>bundled</i>", "text/plain": "bundled"}, {"text/html": {"isolated": True}}

    assert rich_output.mime_bundle(Bundled()) == ({"text/html": "<i>bundled</i>", "text/plain": "bundled"},
                                                   {"text/html": {"isolated": True}})
    assert rich_output.mime_bundle(Rich)[0] == {"text/plain": repr(Rich)}


def test_big_representations_are_dropped_but_text_stays(capsys) -> None:
    data = {"image/png": "A" * (2 * rich_output.MAX_BUNDLE_BYTES), "text/html": "<b>small</b>",
            "application/json": {"bad": object()}, "text/plain": "big thing"}
    assert rich_output._fit(data) == {"text/html": "<b>small</b>", "text/plain": "big thing"}
    err = capsys.readouterr().err
    assert "dropped image/png" in err and "dropped application/json: not JSON" in err


def test_ipython_display_in_the_image_sends_display_events() -> None:
    """The runtime patches IPython's display when a job imports it (this venv has IPython)."""
    code = """
import json, sys
from celery_nb_runtime import events as channel, runner
events = []
channel.sink = events.append
sys.meta_path.insert(0, runner._job_imports)
from IPython.display import display, HTML
display(HTML("<p>via IPython</p>"))
print(json.dumps(events))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    events = json.loads(out.stdout.splitlines()[-1])
    assert [e["data"]["text/html"] for e in events] == ["<p>via IPython</p>"], out.stderr
