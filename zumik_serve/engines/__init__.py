"""The engine seam: values that cross from the gateway to engine replicas, and engine adapters."""
