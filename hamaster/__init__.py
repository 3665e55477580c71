"""hamaster: a highly available, multi-master remote-execution system speaking Salt's wire
protocol."""

__version__ = "0.1.0"
