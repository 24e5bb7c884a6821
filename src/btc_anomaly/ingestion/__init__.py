"""Sources that turn real Bitcoin input into canonical transactions, and the Kafka producer."""
