"""Detection and segmentation training data from pixel masks (or from a detector's anomaly maps)."""
