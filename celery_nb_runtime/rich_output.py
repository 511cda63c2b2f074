"""Rich output from the container: ``display()`` and matplotlib figures as MIME bundles.

Stdlib only and Python 3.9 compatible (runs in any image, which may have no IPython). A job's
``display(obj)`` - and IPython's, when the image has IPython - sends what Jupyter would show
for ``obj`` (HTML, PNG, SVG, Markdown, LaTeX, JSON, and always text/plain) as a "display"
event. pyplot figures are sent as PNG on ``plt.show()`` and after the job, as Jupyter's inline
backend does.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import traceback
from typing import Any, Dict, Optional, Tuple

from celery_nb_runtime import events

# A display travels in the job's event stream (and stays in the kernel's Job): keep it small.
MAX_BUNDLE_BYTES = 1 << 20
_REPR_METHODS = (("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"),
                 ("image/svg+xml", "_repr_svg_"), ("image/png", "_repr_png_"), ("image/jpeg", "_repr_jpeg_"),
                 ("text/latex", "_repr_latex_"), ("application/json", "_repr_json_"))
_BASE64_TYPES = ("image/png", "image/jpeg")

Bundle = Tuple[Dict[str, Any], Dict[str, Any]]  # (data, metadata) as in a Jupyter display_data message


def _warn(message: str) -> None:
    sys.stderr.write("[celery_nb] display: %s\n" % message)


def _call_repr(obj: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """``obj.<name>(...)``, or None when it is missing or fails (which is reported, as IPython does)."""
    method = getattr(obj, name, None)
    if not callable(method):
        return None
    try:
        return method(*args, **kwargs)
    except Exception:
        _warn("%s.%s() failed:\n%s" % (type(obj).__name__, name, traceback.format_exc()))
        return None


def mime_bundle(obj: Any) -> Bundle:
    """What Jupyter would show for ``obj``: its rich representations plus text/plain."""
    data: Dict[str, Any] = {}
    metadata: Dict[str, Any] = {}
    if not isinstance(obj, type):  # a class's _repr_*_ are unbound functions, not its representation
        result = _call_repr(obj, "_repr_mimebundle_", include=None, exclude=None)
        if isinstance(result, tuple):
            result, more = result
            metadata.update(more or {})
        data.update(result or {})
        for mime, name in _REPR_METHODS:
            if mime in data:
                continue
            value = _call_repr(obj, name)
            if isinstance(value, tuple):  # (data, metadata)
                value, metadata[mime] = value
            if value is not None:
                data[mime] = value
    for mime in _BASE64_TYPES:
        if isinstance(data.get(mime), (bytes, bytearray)):
            data[mime] = base64.b64encode(data[mime]).decode("ascii")
    if "text/plain" not in data:
        data["text/plain"] = repr(obj)
    return data, metadata


def _fit(data: Dict[str, Any]) -> Dict[str, Any]:
    """Drop representations that cannot travel as JSON or make the bundle too big (largest
    first, text/plain is always kept)."""
    sizes = {}
    for mime, value in list(data.items()):
        try:
            sizes[mime] = len(json.dumps(value))
        except (TypeError, ValueError) as exc:
            _warn("dropped %s: not JSON (%s)" % (mime, exc))
            del data[mime]
    for mime in sorted(sizes, key=sizes.get, reverse=True):
        if sum(sizes.values()) <= MAX_BUNDLE_BYTES or mime == "text/plain" or mime not in data:
            continue
        _warn("dropped %s of %d bytes: a display may take at most %d bytes" % (mime, sizes[mime], MAX_BUNDLE_BYTES))
        del data[mime], sizes[mime]
    if "text/plain" in sizes and sizes["text/plain"] > MAX_BUNDLE_BYTES:
        data["text/plain"] = data["text/plain"][:MAX_BUNDLE_BYTES // 2] + "..."
    return data


def publish(data: Dict[str, Any], metadata: Optional[Dict[str, Any]] = None) -> None:
    """Send one MIME bundle to the notebook, after what the job printed before it."""
    sys.stdout.flush()
    sys.stderr.flush()
    emit = events.sink
    if emit is None:
        print(data.get("text/plain", ""))
        return
    emit({"type": "display", "data": _fit(dict(data)), "metadata": metadata or {}})


def display(*objs: Any, raw: bool = False, metadata: Optional[Dict[str, Any]] = None, **_ignored: Any) -> None:
    """Show objects in the notebook cell, as IPython's ``display`` does (``raw=True``: the
    objects are MIME bundles already). Other IPython options (display_id, ...) are ignored."""
    if events.sink is None and "IPython" in sys.modules:  # outside a container, in IPython
        from IPython.display import display as ipython_display

        ipython_display(*objs, raw=raw, metadata=metadata)
        return
    for obj in objs:
        data, more = (dict(obj), {}) if raw else mime_bundle(obj)
        publish(data, {**more, **(metadata or {})})


def _figure_png(figure: Any) -> bytes:
    """The figure as PNG, at a lower resolution if needed to stay under the display size limit."""
    dpi = figure.dpi
    for _attempt in range(4):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        png = buffer.getvalue()
        if len(png) * 4 // 3 < MAX_BUNDLE_BYTES * 0.9:  # base64 grows it by a third
            return png
        dpi = dpi * (MAX_BUNDLE_BYTES * 0.6 / (len(png) * 4 / 3)) ** 0.5
    return png


def send_figures() -> None:
    """Send every open pyplot figure as PNG and close it (nothing if pyplot was never imported)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        try:
            png = _figure_png(figure)
        except Exception:
            _warn("figure %d could not be drawn:\n%s" % (number, traceback.format_exc()))
        else:
            publish({"image/png": base64.b64encode(png).decode("ascii"), "text/plain": repr(figure)})
        pyplot.close(figure)


def patch_pyplot(pyplot: Any) -> None:
    """``plt.show()`` sends the open figures (the Agg backend has no window to show them in)."""

    def show(*_args: Any, **_kwargs: Any) -> None:
        send_figures()

    pyplot.show = show


def patch_ipython_display(module: Any) -> None:
    """``IPython.display.display`` in a job sends to the notebook instead of IPython's (absent) kernel."""
    if hasattr(module, "display"):
        module.display = display
