"""Ray Serve deployments: they wire real parts together and hold no policy."""
