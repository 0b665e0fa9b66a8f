"""The baseline: a bare Starlette endpoint that reads the body and answers 204."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def sink(request: Request) -> Response:
    await request.body()
    return Response(status_code=204)


app = Starlette(
    routes=[Route("/reports", sink, methods=["POST"]), Route("/crashpad", sink, methods=["POST"])]
)
