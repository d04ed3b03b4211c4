"""``posttrain ui``: a local web UI. A runs browser with live curves, a compare of 2-4 runs, a chat playground against
the base or any run's adapter, and a form that starts (and stops) runs from the example configs.

No web framework, by decision. posttrain's OpenAI-compatible server is already built on the stdlib ``http.server``,
with connection and body limits and an API key check (serve/http.py); the UI reuses that plumbing, the serving
engine for its chat, and posttrain's own SVG figures (posttrain.report) for its curves. So it adds no dependency to
the lock, starts in well under a second (torch loads on the first chat or figure, not before), and its figures are
the ones in report.html. Gradio would add ~100 MB of dependencies, and FastAPI/uvicorn a second server stack beside
the one posttrain has. The pages are plain HTML and one small script (static/ui.js); nothing is fetched from outside
the machine.

Layer 6, beside serve: imports serve, report, io and errors; never config (the command line, posttrain/cli/ui.py,
passes the config check in).
"""

from posttrain.ui.server import UI, check_exposure

__all__ = ["UI", "check_exposure"]
