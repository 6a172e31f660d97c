"""Loading Diffusers-format model folders: components, weights, pipeline discovery."""
