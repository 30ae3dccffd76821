"""The Gristmill model registry service (``gristmill.api.registry.v1.RegistryService``)."""

SERVICE_NAME = "registry"
