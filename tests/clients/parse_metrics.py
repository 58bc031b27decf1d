#!/usr/bin/env python3
"""Parses an OpenMetrics text exposition from stdin with the Prometheus project's own
strict parser (python3-prometheus-client) and prints {sample name: value} as JSON.
Exits non-zero, with the parser's message, on anything it refuses."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
        samples[key] = s.value
json.dump(samples, sys.stdout)
