"""The MLflow model registry: gated promotion and rollback on aliases, and the pyfunc model that
registered versions carry (docs/registry.md)."""
