"""Many products and many images: fit plans and batch scoring, in this process or on a Ray cluster."""
