"""Model backends: each runs one model behind the ``Backend`` interface."""
