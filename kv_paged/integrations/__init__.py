"""Integrations with model libraries. Each submodule imports its library lazily: `import kv_paged`
never needs them (kv_paged/__init__.py registers the transformers one when it is installed)."""
