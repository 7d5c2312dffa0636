"""Write run-time route changes back into the YAML configuration file, atomically."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from serving.atomic_file import write_atomically
from serving.config import ConfigError, RouteConfig

__all__ = ["RouteFile", "route_to_yaml"]


def route_to_yaml(route: RouteConfig) -> dict[str, Any]:
    """A route as it is written in the config file (defaults left out)."""
    data = route.model_dump(mode="json", exclude_defaults=True)
    data["split"] = {str(v): w for v, w in route.split.items()}
    return data


class RouteFile:
    """Keeps the ``routes`` section of a config file in step with run-time changes.

    Only that section is rewritten (other keys stay as written; comments are lost):
    a temporary file is written and fsynced next to it, then renamed over it.
    Without a file (``path`` None) changes live in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def save(self, name: str, route: RouteConfig | None) -> None:
        """Write ``route`` under ``routes.<name>`` (None removes it)."""
        if self.path is None:
            return
        async with self._lock:
            await asyncio.to_thread(self._rewrite, self.path, name, route)

    async def save_all(self, routes: dict[str, RouteConfig]) -> None:
        """Write the whole ``routes`` section (a fleet's table as this gateway applied it)."""
        if self.path is None:
            return
        async with self._lock:
            await asyncio.to_thread(self._rewrite_all, self.path, routes)

    @staticmethod
    def _rewrite_all(path: Path, routes: dict[str, RouteConfig]) -> None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot update {path}: {e}") from e
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        data.pop("routes", None)
        if routes:
            data["routes"] = {name: route_to_yaml(r) for name, r in sorted(routes.items())}
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        write_atomically(path, text)

    @staticmethod
    def _rewrite(path: Path, name: str, route: RouteConfig | None) -> None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot update {path}: {e}") from e
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        routes = data.get("routes")
        if not isinstance(routes, dict):
            routes = data["routes"] = {}
        if route is None:
            routes.pop(name, None)
        else:
            routes[name] = route_to_yaml(route)
        if not routes:
            data.pop("routes")
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        write_atomically(path, text)
