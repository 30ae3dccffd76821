"""Gristmill console: the web pages people use, over the services' gRPC APIs with the signed-in user's key."""

SERVICE_NAME = "console"
