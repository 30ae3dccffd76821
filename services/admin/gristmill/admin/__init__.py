"""Gristmill admin service: organisations, plans, API keys, usage metering and quotas, licence information."""

SERVICE_NAME = "admin"
