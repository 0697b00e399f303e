"""haodiff_data: human-motion-blur and real-world degradation synthesis into WebDataset shards."""

__version__ = "0.1.0"
