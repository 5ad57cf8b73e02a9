"""Engine hooks, per-token scoring, alert policy and sinks."""
