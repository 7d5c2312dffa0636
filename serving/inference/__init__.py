"""The inference core, free of any web framework.

The service that owns a request from resolved model to encoded answer, and what
it uses: codec, limits, repository, batcher, replica, backends and executors.
"""
