"""The chat page at `/`: one HTML file (`static/chat.html`, no external assets) that streams from this server's
`/v1/chat/completions` in the browser. The page itself needs no API key; it asks for one when `/v1` answers 401."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = files(__package__) / "static" / "chat.html"
# The page loads nothing from elsewhere and sends only to this server; its script and style are inline.
SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@router.get("/", include_in_schema=False)
def chat_page() -> HTMLResponse:
    """The chat page (read per request: it is small, and an edited file shows on reload)."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": SECURITY_POLICY})
