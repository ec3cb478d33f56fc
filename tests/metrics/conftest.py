from tests.metrics.moto_fixtures import aws_env, moto_server

__all__ = ["aws_env", "moto_server"]
