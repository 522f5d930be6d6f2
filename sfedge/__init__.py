"""sfedge: SlowFast-LLaVA-1.5 video LLMs on phones and laptops."""
__version__ = "0.1.0"
