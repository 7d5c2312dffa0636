"""The HTTP gateway: a Starlette app speaking KServe V2."""
