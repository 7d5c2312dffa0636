"""One pure-ASGI middleware per module; `serving.http.app` stacks them in request order."""
