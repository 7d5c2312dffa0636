"""Load tests for a Fermion fleet: locust scenarios, SLO gates and reports with charts.

``fermion loadtest`` drives locust headless (in subprocesses: locust monkey-patches the
process it runs in) and turns what the simulated users measured into a report folder.
Nothing here is imported by ``fermion serve``.
"""

__all__: list[str] = []
