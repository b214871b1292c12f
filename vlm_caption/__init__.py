"""ContraStyles VLM captioning: download, caption, checkpoint and publish, one stage per module."""

__version__ = "0.1.0"
