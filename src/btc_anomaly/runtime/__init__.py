"""Local services (Kafka broker, MLflow server) and JVM classpath helpers."""
