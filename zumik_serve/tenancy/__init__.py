"""Tenants: API keys, authentication, the per-tenant cache salt, and their Redis store."""
