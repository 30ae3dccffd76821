"""The real-stack fixture (registry + serving on real ports, Kafka, S3) shared by the integration modules."""

from services.serving.tests.integration.test_serving_stack import stack  # noqa: F401
