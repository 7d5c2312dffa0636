"""Observability: one metrics registry for every family, tracing set-up and span helpers."""
