"""Which version answers a request.

Weighted splits and sticky keys, the route table and its file, shadow copies,
canary rollouts and the windows of figures they are judged on.
"""
