#!/bin/bash
# Run a Kafka tool class on the broker's classpath, quietly (WARN and above), like the official script.
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} -XX:+UseSerialGC -Djava.awt.headless=true \
  -Dlog4j2.configurationFile=/opt/kafka/etc/tools-log4j2.properties -cp '/opt/kafka/libs/*' "$@"
