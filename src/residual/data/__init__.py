"""Image data: the built-in synthetic shapes (datasets, readers and loaders come with training)."""
