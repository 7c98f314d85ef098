"""Protocol servers that behave like the real peers on the wire (an HTTP delivery endpoint,
OpenSearch's bulk API, Splunk's HTTP Event Collector), used by the tests and the benchmarks."""
