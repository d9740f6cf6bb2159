"""trainhealth sidecar."""
