"""firehose: a self-hosted delivery stream daemon that speaks Amazon Kinesis Data Firehose's API."""

__version__ = "0.1.0"
