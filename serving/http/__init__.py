"""The HTTP transport, the only package that imports Starlette.

App wiring, the inference fast path, V2 and admin routes, and one pure-ASGI
middleware per module under ``middleware/``.
"""
