"""`hybridlm bench`: sparse vs dense, measured side by side in fresh processes."""
