"""Blueprints: v1 predict/model, health, metrics + openapi, admin, KServe v2."""
