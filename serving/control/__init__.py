"""Control state shared by a fleet of gateways: routes, rollouts and their driver's lease,
rate-limit buckets, canary figures, the gateways themselves.

``control.store: memory`` (the default) keeps all of it in the one gateway process, in
the objects that use it; a Redis URL shares it between gateways (and ``--workers``).
"""
