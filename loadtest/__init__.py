"""Load tests for a Fermion fleet: an open-loop engine, locust scenarios, capacity search,
replay of captured traffic, the gateways' side from /metrics, SLO gates and reports.

``fermion loadtest --rate`` sends requests on a schedule (``openloop``, ``open_runner``)
through a transport of the ``transport`` table; without ``--rate`` locust drives
closed-loop users headless (in subprocesses: locust monkey-patches the process it runs
in). Either way what was measured becomes a report folder. Nothing here is imported by
``fermion serve``.
"""

__all__: list[str] = []
