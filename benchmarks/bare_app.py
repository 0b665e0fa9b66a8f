"""The baseline: a bare Starlette endpoint that reads the body and answers (204 for reports;
200 with an id for Crashpad, as a collector must)."""

import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


async def sink(request: Request) -> Response:
    await request.body()
    return Response(status_code=204)


async def crashpad(request: Request) -> Response:
    await request.body()
    return PlainTextResponse(uuid.uuid4().hex)


app = Starlette(
    routes=[
        Route("/reports", sink, methods=["POST"]),
        Route("/crashpad", crashpad, methods=["POST"]),
    ]
)
