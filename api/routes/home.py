"""`GET /`: a small static landing page linking to the API reference, the models and the
dashboard (the original wrapper served one here). It shows nothing but the gateway's version."""

from importlib import resources
from string import Template

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter()

_PAGE = Template(resources.files("api").joinpath("landing.html").read_text(encoding="utf-8"))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def landing(request: Request) -> HTMLResponse:
    return HTMLResponse(_PAGE.substitute(version=request.app.version))
