"""The data contracts: pydantic models for Config, Inventory, Estimate and Plan.

The JSON Schema files beside this module are generated from them: `python -m llama_smart_proxy.schemas`.
"""
